-- Sign-in with OpenID Connect providers.

-- An account's identity at a provider: linked by the provider's subject (never
-- by email alone), one per provider and account.
create table identities (
    provider text not null,
    subject text not null,
    user_id bigint not null references users (id) on delete cascade,
    email text,
    created_at timestamptz not null,
    last_login_at timestamptz,
    primary key (provider, subject),
    constraint identities_user_provider unique (user_id, provider)
);

-- A sign-in under way: what its callback must match (the browser that began it,
-- the nonce its ID token must carry, the PKCE verifier), spent by the callback.
-- `handoff`: a sign-in that ended for a portal, waiting for it to exchange the
-- code it was sent back with (once) for a session.
create table oidc_flows (
    state_hash text primary key,
    kind text not null check (kind in ('login', 'link', 'handoff')),
    provider text not null,
    browser_hash text,
    nonce text,
    verifier text,
    user_id bigint references users (id) on delete cascade,
    return_to text,
    expires_at timestamptz not null
);
create index oidc_flows_expires_at on oidc_flows (expires_at);
