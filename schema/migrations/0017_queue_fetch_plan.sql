-- apalis-postgres fetches with `apalis.get_jobs`, an SQL function, whose statements
-- Postgres plans without their arguments' values: it takes `LIMIT v_job_count` for
-- a tenth of the queue and joins the tasks it picked back to `apalis.jobs` with a
-- hash join over a sequential scan of the whole table, finished tasks included.
-- Every fetch that found work read the table: 35 ms for 100 tasks of 50,000 with
-- four consumers fetching at once (pgbench), 40-64 ms in `ops/bench/queues
-- --prefill`. With hash and merge joins off inside the function, the picked tasks
-- are looked up by their primary key: 10 ms, 3.1 ms with one consumer (14 before).
-- If an apalis upgrade replaces the function, this setting goes with it.
alter function apalis.get_jobs(text, text, integer)
    set enable_hashjoin = off
    set enable_mergejoin = off;
