-- pgvpn schema v6: `pgvpn log` filters (address, port) use indexes on closed days.
--
-- The tunnel's hot path is the insert into today's partition: every index there costs every
-- packet. Rows never arrive in a past day (logged_at is the database's clock), so a day's
-- partition gets its address and port indexes once it is closed, by the agents' housekeeping:
-- queries over past days use them, a query over today scans one day (bounded by the BRIN
-- index on logged_at), and inserts pay nothing. CREATE INDEX on a closed partition blocks only
-- writes to it, which no longer happen.

CREATE FUNCTION pgvpn.index_closed_days()
RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pgvpn
SET lock_timeout = '200ms'
AS $$
DECLARE
    today date := (now() AT TIME ZONE 'UTC')::date;
    p record;
    col text;
    made integer := 0;
BEGIN
    IF NOT pg_try_advisory_xact_lock(hashtext('pgvpn.index_closed_days')) THEN
        RETURN 0;  -- another agent is at it
    END IF;
    FOR p IN SELECT t.partition FROM pgvpn.partitions() t WHERE t.day < today ORDER BY t.day LOOP
        FOREACH col IN ARRAY ARRAY['src_addr', 'dst_addr', 'src_port', 'dst_port'] LOOP
            IF to_regclass(format('pgvpn.%I', p.partition || '_' || col)) IS NULL THEN
                EXECUTE format('CREATE INDEX %I ON pgvpn.%I (%I)',
                               p.partition || '_' || col, p.partition, col);
                made := made + 1;
            END IF;
        END LOOP;
    END LOOP;
    RETURN made;
END
$$;

GRANT EXECUTE ON FUNCTION pgvpn.index_closed_days() TO pgvpn_agent;
