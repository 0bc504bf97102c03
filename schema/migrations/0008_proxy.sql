-- The proxy: the secret each server accepts from the proxy only, browser sessions
-- of the proxy (an opaque cookie, kept as its SHA-256) tied to the session that
-- handed them over, so that logging out of it ends them too.
alter table servers add column proxy_token text;

alter table sessions
    add column token_hash text,
    add column parent_jti uuid;
create unique index sessions_token_hash on sessions (token_hash) where token_hash is not null;
create index sessions_parent_jti on sessions (parent_jti) where parent_jti is not null;

alter table sso_tokens add column session_jti uuid;
