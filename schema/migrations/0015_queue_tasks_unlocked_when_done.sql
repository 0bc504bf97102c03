-- A finished queue task lets go of its consumer (apalis-postgres keeps `lock_by`
-- on it). apalis acknowledges a batch of tasks with a statement that finds them by
-- `lock_by = consumer`, so every acknowledgement read all the tasks its consumer had
-- ever run: each one took longer the longer the consumer lived (5.4 ms on average,
-- 16.5 s of the database's time in 20 s at a steady 500 jobs/s, ops/bench/queues;
-- a sequential scan of the whole table or a bitmap scan of the consumer's rows).
-- Nothing reads `lock_by` of a finished task: apalis takes a task back by it only
-- while it runs, and Berth's own record of who ran a job is `jobs.worker`.
create function berth_unlock_finished_task() returns trigger
language plpgsql as $$
begin
    new.lock_by := null;
    return new;
end
$$;

create trigger berth_unlock_finished_task
    before update on apalis.jobs
    for each row
    when (new.status in ('Done', 'Killed') and new.lock_by is not null)
    execute function berth_unlock_finished_task();

update apalis.jobs set lock_by = null
where status in ('Done', 'Killed') and lock_by is not null;
