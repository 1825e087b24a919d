-- SearchOrders looks for a substring of the description or of any item, ignoring case. pg_trgm's GIN
-- indexes answer `LIKE '%…%'` from the index (for three characters or more) instead of reading every
-- row. pg_trgm is a trusted extension: the database's owner may create it. Its operator classes are
-- named with their schema below, so the indexes build whatever the session's search_path is.
CREATE EXTENSION IF NOT EXISTS pg_trgm WITH SCHEMA public;

-- An index expression must be IMMUTABLE, and array_to_string is only STABLE because it formats
-- elements through their type's output function; for text[] that cannot depend on any setting. The
-- wrapper is IMMUTABLE, and so never inlined: queries and the index both name it.
CREATE FUNCTION order_items_folded(items TEXT[]) RETURNS TEXT
    LANGUAGE sql IMMUTABLE PARALLEL SAFE STRICT
    AS $$ SELECT lower(array_to_string(items, E'\n')) $$;

CREATE INDEX orders_description_trgm ON orders USING gin (lower(description) public.gin_trgm_ops);
CREATE INDEX orders_items_trgm ON orders USING gin (order_items_folded(items) public.gin_trgm_ops);

-- Since this version, inserts take no advisory lock (store/postgres.rs): ListOrders pages by `seq` with
-- the keyset guarantee, and idempotent creates rely on the unique request_id alone.
