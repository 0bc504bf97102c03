-- Berth's own tables. The queue backend keeps its transport tables elsewhere
-- (apalis-postgres in the `apalis` schema); `jobs` here is the backend-neutral
-- record of every job that the API and operators read.

create table users (
    id bigserial primary key,
    name text not null,
    role text not null default 'user' check (role in ('user', 'admin')),
    state text not null default 'active' check (state in ('active', 'deleting')),
    cleanup_job_id uuid,
    created_at timestamptz not null default now(),
    last_activity timestamptz,
    constraint users_name_key unique (name)
);

create table jobs (
    id uuid primary key,
    kind text not null check (kind in ('spawn', 'stop', 'cleanup')),
    state text not null default 'queued'
        check (state in ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    user_name text not null,
    server_name text,
    payload jsonb not null default '{}',
    attempts integer not null default 0,
    last_error text,
    worker text,
    created_at timestamptz not null default now(),
    started_at timestamptz,
    finished_at timestamptz
);

create index jobs_state_created_at on jobs (state, created_at);
create index jobs_user_name on jobs (user_name, created_at);

create table servers (
    id bigserial primary key,
    user_id bigint not null references users (id) on delete cascade,
    name text not null,
    state text not null
        check (state in ('pending_spawn', 'running', 'pending_stop', 'stopped', 'failed')),
    image text,
    spawn_job_id uuid,
    stop_job_id uuid,
    container_id text,
    url text,
    error text,
    token_hash text,
    requested_at timestamptz not null default now(),
    started_at timestamptz,
    stopped_at timestamptz,
    last_activity timestamptz,
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now(),
    constraint servers_user_id_name_key unique (user_id, name)
);

create index servers_state on servers (state);
