-- What a spawn went through, for its progress stream: the API writes the first
-- event with the request, the worker one per step, and the last says ready or failed.
-- Listeners hear `berth_progress` (payload: the job id) and read what is new.
create table spawn_events (
    id bigserial primary key,
    job_id uuid not null references jobs (id) on delete cascade,
    progress smallint not null check (progress between 0 and 100),
    message text not null,
    ready boolean not null default false,
    failed boolean not null default false,
    url text,
    created_at timestamptz not null default clock_timestamp()
);
create index spawn_events_job_id on spawn_events (job_id, id);

-- An operator's retry is a new job that names the one it retries.
alter table jobs add column retry_of uuid;

-- The dashboard's job list: newest first, filtered by kind, state and user.
create index jobs_created_at_id on jobs (created_at desc, id desc);
create index jobs_kind_state_created on jobs (kind, state, created_at desc);

-- The resource limits a server's container was started with, as the worker set them.
alter table servers add column mem_limit bigint, add column cpu_limit real;
