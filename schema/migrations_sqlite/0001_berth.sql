-- Berth's tables on the embedded SQLite store (`berth up` without a database URL).
-- The same tables and columns as on Postgres, with SQLite's types: uuids are
-- 16-byte blobs, times RFC 3339 text in UTC written by Berth (never by SQLite, so
-- that they compare as text in time order), JSON is text. Spawn slots, server
-- locks and notifications live in the one process that owns the file.

create table users (
    id integer primary key autoincrement,
    name text not null unique,
    role text not null default 'user' check (role in ('user', 'admin')),
    state text not null default 'active' check (state in ('active', 'deleting')),
    cleanup_job_id blob,
    created_at text not null,
    last_activity text,
    email text,
    password_hash text,
    active boolean not null default 1
);
create unique index users_email_key on users (lower(email)) where email is not null;

create table jobs (
    id blob primary key,
    kind text not null
        check (kind in ('spawn', 'stop', 'cleanup', 'cull', 'expire_sessions', 'archive')),
    state text not null default 'queued'
        check (state in ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    user_name text not null,
    server_name text,
    payload text not null default '{}',
    attempts integer not null default 0,
    last_error text,
    worker text,
    created_at text not null,
    started_at text,
    finished_at text,
    claimed_by blob,
    claimed_at text,
    result text,
    retry_of blob
);
create index jobs_state_created_at on jobs (state, created_at);
create index jobs_user_name on jobs (user_name, created_at);
create index jobs_created_at_id on jobs (created_at desc, id desc);
create index jobs_kind_state_created on jobs (kind, state, created_at desc);
create index jobs_finished_at on jobs (finished_at) where finished_at is not null;

-- The queue: one row per job not yet done, removed when its handler ends.
create table queue (
    job_id blob primary key references jobs (id) on delete cascade,
    queue text not null,
    run_at text not null,
    deliveries integer not null default 0,
    taken_by text,
    last_error text
);
create index queue_due on queue (queue, run_at) where taken_by is null;

create table servers (
    id integer primary key autoincrement,
    user_id integer not null references users (id) on delete cascade,
    name text not null,
    state text not null
        check (state in ('pending_spawn', 'running', 'pending_stop', 'stopped', 'failed')),
    image text,
    spawn_job_id blob,
    stop_job_id blob,
    container_id text,
    url text,
    error text,
    token_hash text,
    requested_at text not null,
    started_at text,
    stopped_at text,
    last_activity text,
    created_at text not null,
    updated_at text not null,
    warning text,
    warned_at text,
    mem_limit integer,
    cpu_limit real,
    unique (user_id, name)
);
create index servers_state on servers (state);
create index servers_token_hash on servers (token_hash) where token_hash is not null;

create table sessions (
    jti blob primary key,
    user_id integer not null references users (id) on delete cascade,
    issued_at text not null,
    expires_at text not null,
    revoked_at text,
    client_addr text
);
create index sessions_user_id on sessions (user_id);
create index sessions_expires_at on sessions (expires_at);

create table api_tokens (
    id blob primary key,
    name text not null,
    token_hash text not null unique,
    scopes text not null,
    created_by text,
    created_at text not null,
    expires_at text,
    last_used_at text,
    revoked_at text
);

create table sso_tokens (
    token_hash text primary key,
    user_id integer not null references users (id) on delete cascade,
    server_name text not null,
    created_at text not null,
    expires_at text not null,
    used_at text
);

create table login_throttle (
    key text primary key,
    failures integer not null,
    window_start text not null,
    locked_until text
);

create table audit_log (
    id integer primary key autoincrement,
    at text not null,
    actor text,
    action text not null,
    target text,
    client_addr text,
    detail text not null default '{}'
);
create index audit_log_at on audit_log (at);

create table platform_limits (
    id integer primary key check (id = 1),
    concurrent_spawn_limit integer check (concurrent_spawn_limit > 0),
    active_server_limit integer check (active_server_limit > 0),
    updated_at text,
    updated_by text
);
insert into platform_limits (id) values (1);

create table spawn_attempts (
    id integer primary key autoincrement,
    job_id blob not null references jobs (id) on delete cascade,
    worker text not null,
    slot integer not null,
    started_at text not null,
    ended_at text
);
create index spawn_attempts_job_id on spawn_attempts (job_id);

create table workers (
    name text primary key,
    host text not null,
    pid integer not null,
    backend text not null,
    version text not null,
    started_at text not null,
    last_seen text not null,
    jobs_in_flight integer not null default 0,
    stopped_at text
);

create table admission_tokens (
    slot integer primary key,
    server_id integer unique references servers (id) on delete set null
);

create table activity_log (
    id integer primary key autoincrement,
    user_name text not null,
    server_name text,
    at text not null,
    recorded_at text not null
);
create index activity_log_recorded_at on activity_log (recorded_at);

create table schedules (
    name text primary key,
    expression text not null,
    kind text not null,
    payload text not null default '{}',
    next_run_at text,
    registered_at text not null
);

create table schedule_runs (
    id integer primary key autoincrement,
    schedule text not null,
    tick text not null,
    manual boolean not null default 0,
    job_id blob not null,
    created_at text not null,
    unique (schedule, tick)
);

create table archive_files (
    table_name text not null,
    day text not null,
    path text not null,
    committed_bytes integer not null default 0,
    rows integer not null default 0,
    primary key (table_name, day)
);

create table spawn_events (
    id integer primary key autoincrement,
    job_id blob not null references jobs (id) on delete cascade,
    progress integer not null check (progress between 0 and 100),
    message text not null,
    ready boolean not null default 0,
    failed boolean not null default 0,
    url text,
    created_at text not null
);
create index spawn_events_job_id on spawn_events (job_id, id);
