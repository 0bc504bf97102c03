-- Each job names the account it is about, not only the name: a name deleted and
-- registered again belongs to a newcomer, who must not read the old account's
-- jobs. Jobs from before this column are given to the account that held the
-- name when they were created, where one still does.
alter table jobs add column user_id bigint;
update jobs j set user_id = u.id from users u
    where u.name = j.user_name and u.created_at <= j.created_at;
-- No index: nothing looks jobs up by account, and every index is one more write
-- (and lock) in each spawn request.
