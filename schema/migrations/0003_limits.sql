-- Global limits, the record of spawn slots, and the worker registry.

-- Runtime overrides of the configured limits; null means "as configured".
create table platform_limits (
    id boolean primary key default true check (id),
    concurrent_spawn_limit integer check (concurrent_spawn_limit > 0),
    active_server_limit integer check (active_server_limit > 0),
    updated_at timestamptz not null default now(),
    updated_by text
);
insert into platform_limits (id) values (true);

-- One row per spawn that held a slot: when it started, when it ended, on which worker.
-- The slot itself is a Postgres session advisory lock, so a worker that dies frees it.
create table spawn_attempts (
    id bigserial primary key,
    job_id uuid not null references jobs (id) on delete cascade,
    worker text not null,
    slot integer not null,
    started_at timestamptz not null default clock_timestamp(),
    ended_at timestamptz
);
create index spawn_attempts_job_id on spawn_attempts (job_id);
create index spawn_attempts_open on spawn_attempts (started_at) where ended_at is null;

-- A delivery of a spawn that waits for a slot claims the job, and renews the claim
-- while it waits, so that a second delivery of the same job (apalis re-runs long
-- jobs) does not wait, and take a slot, beside it.
alter table jobs add column claimed_by uuid, add column claimed_at timestamptz;

-- Spawns waiting for a slot, oldest first.
create index jobs_waiting_spawns on jobs (created_at, id) where kind = 'spawn' and state = 'queued';

create table workers (
    name text primary key,
    host text not null,
    pid integer not null,
    backend text not null,
    version text not null,
    started_at timestamptz not null default now(),
    last_seen timestamptz not null default now(),
    jobs_in_flight integer not null default 0,
    stopped_at timestamptz
);

-- Takes the first free slot below `lim` as a session lock; null when all are taken.
create function berth_try_spawn_slot(space integer, lim integer) returns integer
language plpgsql volatile as $$
declare
    k integer;
begin
    for k in 0 .. lim - 1 loop
        if pg_try_advisory_lock(space, k) then
            return k;
        end if;
    end loop;
    return null;
end
$$;

-- Admission to the active-server limit: one row per place. A spawn request claims
-- a free place with `for update skip locked`, so concurrent requests on any number
-- of API processes never wait on one another and never overshoot; a server gives
-- its place back when it ends stopped or failed (or is deleted).
create table admission_tokens (
    slot integer primary key,
    server_id bigint unique references servers (id) on delete set null
);
