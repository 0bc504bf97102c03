-- Sign-in with OpenID Connect providers (see the Postgres migration 0014).
create table identities (
    provider text not null,
    subject text not null,
    user_id integer not null references users (id) on delete cascade,
    email text,
    created_at text not null,
    last_login_at text,
    primary key (provider, subject),
    unique (user_id, provider)
);

create table oidc_flows (
    state_hash text primary key,
    kind text not null check (kind in ('login', 'link', 'handoff')),
    provider text not null,
    browser_hash text,
    nonce text,
    verifier text,
    user_id integer references users (id) on delete cascade,
    return_to text,
    expires_at text not null
);
create index oidc_flows_expires_at on oidc_flows (expires_at);
