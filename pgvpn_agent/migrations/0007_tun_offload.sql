-- TUN offload: a row may hold a TCP burst the kernel segments on the way out (TSO), with a
-- partial checksum. The virtio-net header TUN handed the sender is kept with the row, so the
-- receiver can give the burst back to its kernel exactly as it was read, and an operator can
-- tell a 64 KB row from a jumbo packet.

ALTER TABLE pgvpn.packet ADD COLUMN offload bytea;
COMMENT ON COLUMN pgvpn.packet.offload IS
    'virtio_net_hdr as read from the TUN (flags, gso_type, hdr_len, gso_size, csum_start, '
    'csum_offset; host byte order); NULL for a plain packet. gso_size > 0: a TSO burst that '
    'leaves as ceil((length - hdr_len) / gso_size) packets; flags = 1: the TCP/UDP checksum in '
    'payload is partial (filled in by the kernel that sends it).';

DROP FUNCTION pgvpn.send_batch(smallint, boolean, smallint[], bigint[], bigint[],
    smallint[], bigint[], timestamptz[], smallint[], inet[], inet[], smallint[], integer[],
    integer[], integer[], boolean[], bytea[]);

-- As in schema v1, with the offload headers as one more column.
CREATE FUNCTION pgvpn.send_batch(
    p_src smallint,
    p_notify boolean,
    l_dst smallint[], l_first bigint[], l_last bigint[],
    r_dst smallint[], r_seq bigint[], r_sent_at timestamptz[], r_version smallint[],
    r_src_addr inet[], r_dst_addr inet[], r_protocol smallint[], r_src_port integer[],
    r_dst_port integer[], r_length integer[], r_fragment boolean[], r_payload bytea[],
    r_offload bytea[])
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
    IF p_notify THEN
        PERFORM pg_notify('pgvpn_' || p.name, p_src || ':' || v.last)
        FROM unnest(l_dst, l_last) AS v (dst, last) JOIN pgvpn.peer p ON p.id = v.dst;
    END IF;
END
$$;

REVOKE ALL ON FUNCTION pgvpn.send_batch(smallint, boolean, smallint[], bigint[], bigint[],
    smallint[], bigint[], timestamptz[], smallint[], inet[], inet[], smallint[], integer[],
    integer[], integer[], boolean[], bytea[], bytea[]) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pgvpn.send_batch(smallint, boolean, smallint[], bigint[], bigint[],
    smallint[], bigint[], timestamptz[], smallint[], inet[], inet[], smallint[], integer[],
    integer[], integer[], boolean[], bytea[], bytea[]) TO pgvpn_agent;
