-- Server profiles: what a user may pick when spawning (an image, limits, an
-- environment, mounts, GPUs, timeouts) and who may pick it. The definition is the
-- profile as JSON (`schema::profiles::Profile`), so both dialects keep it alike;
-- `max_active` is a column because admission reads it.
create table profiles (
    name text primary key,
    definition text not null,
    max_active integer check (max_active > 0),
    -- 'api' (made through the API or dashboard) or 'file' (BERTH_PROFILES, which
    -- replaces its own profiles at every start).
    source text not null default 'api' check (source in ('api', 'file')),
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now(),
    updated_by text
);

-- Admission to a profile's own limit, as admission_tokens for the platform's: one
-- row per place, claimed with `for update skip locked`, given back when the
-- server ends. A server holds at most one place of its profile.
create table profile_places (
    profile text not null references profiles (name) on delete cascade,
    slot integer not null,
    server_id bigint unique references servers (id) on delete set null,
    primary key (profile, slot)
);
create index profile_places_free on profile_places (profile, slot) where server_id is null;

-- A server keeps the profile it was requested with, as it was then: a profile
-- changed or removed later affects only new spawns. The timeouts are columns
-- because the culler selects by them.
alter table servers
    add column profile text,
    add column profile_spec text,
    add column idle_timeout_secs bigint,
    add column max_age_secs bigint;

-- Groups an account belongs to (a JSON list of names), for profiles' rules.
alter table users add column groups text not null default '[]';
