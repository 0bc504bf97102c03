-- Scopes as a JSON array, as the embedded store keeps them: one statement reads
-- and writes them on both databases.
alter table api_tokens alter column scopes type jsonb using to_jsonb(scopes);
