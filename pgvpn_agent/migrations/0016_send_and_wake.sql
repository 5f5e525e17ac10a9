-- Schema v16: a batch and its receivers' wake-up in one call, still two transactions.
--
-- Since v13 a sender in full flow commits its batch (send_batch) and then wakes the receivers
-- with a second statement (wake), so that the notification lock is never held through a WAL
-- flush. That second statement was a second round trip per batch: the agent's send, the
-- server's wake-up, its reply, the agent's wake-up again, on a machine whose cores are
-- already busy with every other peer. This procedure takes both in one CALL: it commits the
-- batch (the session's synchronous_commit: the WAL flush first), then sends the wake-up in a
-- transaction of its own, exactly as the two statements did.
--
-- It runs with the caller's rights (a procedure that commits may not be SECURITY DEFINER nor
-- carry a SET clause): it can do nothing its caller could not do with the two functions, and
-- names them with their schema. An error after its commit (the NOTIFY queue full: SQLSTATE
-- 54000 at the wake-up's commit) leaves the batch logged; the agent tells the two apart.
CREATE PROCEDURE pgvpn.send_and_wake(
    p_src smallint,
    l_dst smallint[], l_first bigint[], l_last bigint[],
    r_dst smallint[], r_seq bigint[], r_sent_at timestamptz[], r_version smallint[],
    r_src_addr inet[], r_dst_addr inet[], r_protocol smallint[], r_src_port integer[],
    r_dst_port integer[], r_length integer[], r_fragment boolean[], r_payload bytea[],
    r_offload bytea[],
    c_src smallint[], c_last bigint[])
LANGUAGE plpgsql
AS $$
BEGIN
    PERFORM pgvpn.send_batch(p_src, false, l_dst, l_first, l_last, r_dst, r_seq, r_sent_at,
                             r_version, r_src_addr, r_dst_addr, r_protocol, r_src_port,
                             r_dst_port, r_length, r_fragment, r_payload, r_offload,
                             c_src, c_last);
    COMMIT;
    PERFORM pgvpn.wake(l_dst, l_last);
END
$$;
COMMENT ON PROCEDURE pgvpn.send_and_wake(smallint, smallint[], bigint[], bigint[], smallint[],
    bigint[], timestamptz[], smallint[], inet[], inet[], smallint[], integer[], integer[],
    integer[], boolean[], bytea[], bytea[], smallint[], bigint[]) IS
    'send_batch() without its NOTIFY, committed, then wake() in a transaction of its own.';
REVOKE ALL ON PROCEDURE pgvpn.send_and_wake(smallint, smallint[], bigint[], bigint[],
    smallint[], bigint[], timestamptz[], smallint[], inet[], inet[], smallint[], integer[],
    integer[], integer[], boolean[], bytea[], bytea[], smallint[], bigint[]) FROM PUBLIC;
GRANT EXECUTE ON PROCEDURE pgvpn.send_and_wake(smallint, smallint[], bigint[], bigint[],
    smallint[], bigint[], timestamptz[], smallint[], inet[], inet[], smallint[], integer[],
    integer[], integer[], boolean[], bytea[], bytea[], smallint[], bigint[]) TO pgvpn_agent;
