-- pgvpn schema v4: retention. Old day partitions are dropped by age and by a size budget.
--
-- Dropping a partition takes a short exclusive lock on pgvpn.packet; lock_timeout bounds how
-- long inserts may wait behind it (a retention run that cannot get the lock gives up and tries
-- again later: the tunnel is never blocked for long). The current and future days are never
-- dropped, whatever the budget says.

CREATE FUNCTION pgvpn.partitions()
RETURNS TABLE (partition text, day date, bytes bigint)
LANGUAGE sql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pgvpn
AS $$
    SELECT c.relname::text, to_date(substring(c.relname FROM 8), 'YYYYMMDD'),
           pg_total_relation_size(c.oid)
    FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
    WHERE i.inhparent = 'pgvpn.packet'::regclass AND c.relname ~ '^packet_[0-9]{8}$'
    ORDER BY 2
$$;

CREATE FUNCTION pgvpn.apply_retention(keep_days integer, max_bytes bigint DEFAULT NULL)
RETURNS TABLE (partition text, day date, bytes bigint, reason text)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pgvpn
SET lock_timeout = '200ms'
AS $$
DECLARE
    today date := (now() AT TIME ZONE 'UTC')::date;
    total bigint;
    p record;
BEGIN
    IF NOT pg_try_advisory_xact_lock(hashtext('pgvpn.apply_retention')) THEN
        RETURN;  -- another agent is at it
    END IF;
    SELECT coalesce(sum(t.bytes), 0) INTO total FROM pgvpn.partitions() t;
    FOR p IN SELECT * FROM pgvpn.partitions() t WHERE t.day < today ORDER BY t.day LOOP
        IF keep_days IS NOT NULL AND p.day < today - keep_days THEN
            reason := 'age';
        ELSIF max_bytes IS NOT NULL AND total > max_bytes THEN
            reason := 'size';
        ELSE
            EXIT;
        END IF;
        EXECUTE format('DROP TABLE pgvpn.%I', p.partition);
        total := total - p.bytes;
        partition := p.partition;
        day := p.day;
        bytes := p.bytes;
        RETURN NEXT;
    END LOOP;
END
$$;

GRANT EXECUTE ON FUNCTION pgvpn.partitions() TO pgvpn_agent, pgvpn_reader;
GRANT EXECUTE ON FUNCTION pgvpn.apply_retention(integer, bigint) TO pgvpn_agent;
