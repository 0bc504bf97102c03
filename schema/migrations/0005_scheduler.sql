-- The scheduler's jobs, the activity users report, and what archiving wrote.

alter table jobs drop constraint jobs_kind_check;
alter table jobs add constraint jobs_kind_check
    check (kind in ('spawn', 'stop', 'cleanup', 'cull', 'expire_sessions', 'archive'));
-- What a maintenance job did (servers stopped, rows archived…).
alter table jobs add column result jsonb;
create index jobs_finished_at on jobs (finished_at) where finished_at is not null;

-- Set when a server nears its maximum age: the user sees when it will be stopped.
alter table servers add column warning text;
alter table servers add column warned_at timestamptz;

-- Every activity report, per server, for the record (archived like the job history).
create table activity_log (
    id bigserial primary key,
    user_name text not null,
    server_name text,
    at timestamptz not null,
    recorded_at timestamptz not null default now()
);
create index activity_log_recorded_at on activity_log (recorded_at);

-- Each schedule as the scheduler last registered it, and every tick it enqueued.
-- A tick is (schedule, scheduled time): unique, so replicas enqueue it once.
create table schedules (
    name text primary key,
    expression text not null,
    kind text not null,
    payload jsonb not null default '{}',
    next_run_at timestamptz,
    registered_at timestamptz not null default now()
);
create table schedule_runs (
    id bigserial primary key,
    schedule text not null,
    tick timestamptz not null,
    manual boolean not null default false,
    job_id uuid not null,
    created_at timestamptz not null default now(),
    constraint schedule_runs_tick unique (schedule, tick)
);
create index schedule_runs_latest on schedule_runs (schedule, tick desc) where not manual;

-- Archive files: the bytes known to hold committed rows. A batch appends to the
-- file, then deletes its rows and moves `committed_bytes` in one transaction; bytes
-- past it are from a batch that did not commit and are cut off before the next.
create table archive_files (
    table_name text not null,
    day date not null,
    path text not null,
    committed_bytes bigint not null default 0,
    rows bigint not null default 0,
    primary key (table_name, day)
);
