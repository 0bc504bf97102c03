-- One reading of the platform a minute, for the dashboard's charts: whichever
-- worker comes first in a minute writes it (the minute is the key), and eight days
-- are kept. Spawn latency and failures are not sampled: they are read from the
-- jobs themselves.
create table platform_samples (
    at text primary key,
    queued integer not null,
    spawns_in_flight integer not null,
    active_servers integer not null
);
