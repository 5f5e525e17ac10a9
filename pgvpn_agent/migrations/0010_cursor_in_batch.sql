-- A batch carries its agent's receiver cursors: the packets that agent just wrote to its TUN
-- (pgvpn_agent/delivered.py). Saving them in the batch's own transaction, instead of one more
-- transaction per page delivered, is what makes a TCP ACK batch one commit and not two.
-- c_src/c_last may be empty; the cursor only moves forward, and only on links to the caller.

DROP FUNCTION pgvpn.send_batch(smallint, boolean, smallint[], bigint[], bigint[],
    smallint[], bigint[], timestamptz[], smallint[], inet[], inet[], smallint[], integer[],
    integer[], integer[], boolean[], bytea[], bytea[]);

CREATE FUNCTION pgvpn.send_batch(
    p_src smallint,
    p_notify boolean,
    l_dst smallint[], l_first bigint[], l_last bigint[],
    r_dst smallint[], r_seq bigint[], r_sent_at timestamptz[], r_version smallint[],
    r_src_addr inet[], r_dst_addr inet[], r_protocol smallint[], r_src_port integer[],
    r_dst_port integer[], r_length integer[], r_fragment boolean[], r_payload bytea[],
    r_offload bytea[],
    c_src smallint[], c_last bigint[])
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pgvpn
AS $$
DECLARE
    advanced integer;
BEGIN
    IF p_src IS DISTINCT FROM pgvpn.my_peer() THEN
        RAISE EXCEPTION 'pgvpn: role % may only send as its own peer', session_user
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    UPDATE pgvpn.link l SET tx_seq = v.last, tx_at = statement_timestamp()
    FROM unnest(l_dst, l_first, l_last) AS v (dst, first, last)
    WHERE l.src = p_src AND l.dst = v.dst AND l.tx_seq = v.first - 1;
    GET DIAGNOSTICS advanced = ROW_COUNT;
    IF advanced <> cardinality(l_dst) THEN
        RAISE EXCEPTION 'pgvpn: link sequence moved under sender % (another agent with the same peer name?)', p_src
            USING ERRCODE = 'PV001';
    END IF;
    INSERT INTO pgvpn.packet (src_peer, dst_peer, seq, sent_at, ip_version, src_addr, dst_addr,
                              protocol, src_port, dst_port, length, fragment, payload, offload)
    SELECT p_src, r.dst, r.seq, r.sent_at, r.version, r.src_addr, r.dst_addr, r.protocol,
           r.src_port, r.dst_port, r.length, r.fragment, r.payload, r.offload
    FROM unnest(r_dst, r_seq, r_sent_at, r_version, r_src_addr, r_dst_addr, r_protocol,
                r_src_port, r_dst_port, r_length, r_fragment, r_payload, r_offload)
         AS r (dst, seq, sent_at, version, src_addr, dst_addr, protocol, src_port, dst_port,
               length, fragment, payload, offload);
    IF cardinality(c_src) > 0 THEN
        UPDATE pgvpn.cursor c SET rx_seq = v.last, rx_at = statement_timestamp()
        FROM unnest(c_src, c_last) AS v (src, last)
        WHERE c.dst = p_src AND c.src = v.src AND c.rx_seq < v.last;
    END IF;
    IF p_notify THEN
        PERFORM pg_notify('pgvpn_' || p.name, p_src || ':' || v.last)
        FROM unnest(l_dst, l_last) AS v (dst, last) JOIN pgvpn.peer p ON p.id = v.dst;
    END IF;
END
$$;

REVOKE ALL ON FUNCTION pgvpn.send_batch(smallint, boolean, smallint[], bigint[], bigint[],
    smallint[], bigint[], timestamptz[], smallint[], inet[], inet[], smallint[], integer[],
    integer[], integer[], boolean[], bytea[], bytea[], smallint[], bigint[]) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pgvpn.send_batch(smallint, boolean, smallint[], bigint[], bigint[],
    smallint[], bigint[], timestamptz[], smallint[], inet[], inet[], smallint[], integer[],
    integer[], integer[], boolean[], bytea[], bytea[], smallint[], bigint[]) TO pgvpn_agent;
