-- Schema v13: the receivers' wake-up apart from the batch's commit.
--
-- A NOTIFY in a transaction takes the database's notification lock at pre-commit and keeps it
-- until the commit is done, WAL flush (and the synchronous standby's confirmation) included:
-- every notifying commit in the cluster waits for the one before it, and group commit is lost
-- (bench mesh: with five pairs sending, 58-65 % of the senders' backends waited on that lock,
-- and WAL flushes per second equalled batches per second). The agent now commits its batch
-- without a NOTIFY and wakes the receivers with a second transaction that writes no row: its
-- commit (NOTIFY's own transaction id and commit record) does not wait for a WAL flush or a
-- standby, so it holds the lock for microseconds, and batches' commits share flushes again.
-- A packet is still logged, durably, before anyone is woken to read it. send_batch()'s own
-- p_notify stays for agents of v12 and for `transport.wake = "in_commit"`.
CREATE FUNCTION pgvpn.wake(l_dst smallint[], l_last bigint[])
RETURNS integer
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, pgvpn, pg_temp
AS $$
DECLARE
    me smallint := pgvpn.my_peer();
    woken integer;
BEGIN
    IF me IS NULL THEN
        RAISE EXCEPTION 'pgvpn: role % is not a registered peer', session_user
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    -- Only the caller's own links, and only up to what they committed: a peer cannot wake a
    -- receiver of another link, nor announce rows that do not exist (the receiver reads past
    -- its cursor anyway; this keeps the wake-up as honest as send_batch's).
    PERFORM pg_notify(p.channel, me || ':' || v.last)
    FROM unnest(l_dst, l_last) AS v (dst, last)
    JOIN pgvpn.link l ON l.src = me AND l.dst = v.dst AND v.last BETWEEN 1 AND l.tx_seq
    JOIN pgvpn.peer p ON p.id = v.dst;
    GET DIAGNOSTICS woken = ROW_COUNT;
    RETURN woken;
END
$$;
COMMENT ON FUNCTION pgvpn.wake(smallint[], bigint[]) IS
    'Wake the receivers of the caller''s links up to what it committed (after send_batch).';
REVOKE ALL ON FUNCTION pgvpn.wake(smallint[], bigint[]) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pgvpn.wake(smallint[], bigint[]) TO pgvpn_agent;
