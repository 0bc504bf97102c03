-- Jobs bound for a broker outside the database (NATS JetStream). The API writes a
-- row in the same transaction as the job, so a recorded request can never lose its
-- message; a relay publishes rows (the message id de-duplicates a row published
-- twice) and deletes each one once the broker has acknowledged it.
create table outbox (
    id bigserial primary key,
    job_id uuid not null,
    queue text not null,
    payload jsonb not null,
    created_at timestamptz not null default now(),
    attempts int not null default 0,
    last_error text
);
