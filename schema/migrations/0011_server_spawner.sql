-- Which spawner started a server ("docker" or "process"), so that a worker started
-- later with another spawner stops and checks the server with the one that started
-- it, instead of finding no container and failing a server that still runs.
-- Servers started before this column are taken to be the current worker's.
alter table servers add column spawner text;
