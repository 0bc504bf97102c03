-- apalis-postgres's first migration indexed `apalis.jobs (id)` and `(lock_by)`,
-- and `apalis.workers (id)`, `(worker_type)` and `(last_seen)`; its later ones added
-- a primary key and indexes of its own on the same columns, but dropped only some
-- of the first ones. The copies left are written at every fetch and acknowledgement
-- (a task's update moves `lock_by` and is never a HOT update) and never read that
-- their twins would not serve. (`unique_worker_id` stays: the foreign key from
-- `apalis.jobs (lock_by)` is bound to it.)
drop index if exists apalis.unique_job_id;
drop index if exists apalis.lidx;
drop index if exists apalis.wtidx;
drop index if exists apalis.lsidx;
