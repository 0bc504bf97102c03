-- Server profiles (see the Postgres migration 0013_profiles.sql for the why).
create table profiles (
    name text primary key,
    definition text not null,
    max_active integer check (max_active > 0),
    source text not null default 'api' check (source in ('api', 'file')),
    created_at text not null,
    updated_at text not null,
    updated_by text
);

create table profile_places (
    profile text not null references profiles (name) on delete cascade,
    slot integer not null,
    server_id integer unique references servers (id) on delete set null,
    primary key (profile, slot)
);
create index profile_places_free on profile_places (profile, slot) where server_id is null;

alter table servers add column profile text;
alter table servers add column profile_spec text;
alter table servers add column idle_timeout_secs integer;
alter table servers add column max_age_secs integer;

alter table users add column groups text not null default '[]';
