-- Accounts: passwords, login sessions (JWT ids, for logout), service tokens,
-- single-use SSO hand-off tokens, login throttling shared by all API processes,
-- and the audit log of security events.

alter table users
    add column email text,
    add column password_hash text,
    add column active boolean not null default true;

create unique index users_email_key on users (lower(email)) where email is not null;

create table sessions (
    jti uuid primary key,
    user_id bigint not null references users (id) on delete cascade,
    issued_at timestamptz not null default now(),
    expires_at timestamptz not null,
    revoked_at timestamptz,
    client_addr text
);

create index sessions_user_id on sessions (user_id);
create index sessions_expires_at on sessions (expires_at);

create table api_tokens (
    id uuid primary key,
    name text not null,
    token_hash text not null,
    scopes text[] not null,
    created_by text,
    created_at timestamptz not null default now(),
    expires_at timestamptz,
    last_used_at timestamptz,
    revoked_at timestamptz,
    constraint api_tokens_token_hash_key unique (token_hash)
);

create table sso_tokens (
    token_hash text primary key,
    user_id bigint not null references users (id) on delete cascade,
    server_name text not null,
    created_at timestamptz not null default now(),
    expires_at timestamptz not null,
    used_at timestamptz
);

create index sso_tokens_expires_at on sso_tokens (expires_at);

create table login_throttle (
    key text primary key,
    failures integer not null,
    window_start timestamptz not null,
    locked_until timestamptz
);

create table audit_log (
    id bigserial primary key,
    at timestamptz not null default now(),
    actor text,
    action text not null,
    target text,
    client_addr text,
    detail jsonb not null default '{}'
);

create index audit_log_at on audit_log (at);
create index servers_token_hash on servers (token_hash) where token_hash is not null;
