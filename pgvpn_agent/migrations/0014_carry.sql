-- Schema v14: small sealed packets ride in their batch's notification as well as in the log.
--
-- A small packet's path was: the sender's commit, the NOTIFY, then the receiver's fetch, a
-- round trip to read back the row it was just told about. When every row a batch logs on a
-- link is sealed with the pair's key (payload = length + 29 bytes: key id, nonce, tag) and
-- together they stay under pgvpn.limits.carry_bytes, the notification now carries them,
-- base64, after "src:last": "src:last:row,row,..." (a row: its payload, then '.' and its
-- offload header if it has one). The database builds it from the rows it
-- is inserting in the same transaction, so what a receiver reads there is what the log holds,
-- and it is sent only once the commit (synchronous, with its WAL flush) is done: every packet
-- is logged before it is delivered. Only sealed payloads travel that way: anyone who knows a
-- channel's name may LISTEN to it, and only the receiving peer can open them. The receiver
-- falls back to the table on anything it cannot use (a gap before the first carried row, a
-- payload it cannot open, a malformed notification): the log stays the authority.
--
-- send_batch() also checks a batch's sizes and headers in one pass over its rows instead of
-- five (each aggregate was a plan node started per call): side by side in the lab, a
-- one-row batch 0.77 -> 0.72 ms p50, 64 rows 1.49 -> 1.39 ms.
ALTER TABLE pgvpn.limits
    ADD COLUMN carry_bytes integer NOT NULL DEFAULT 3000 CHECK (carry_bytes BETWEEN 0 AND 5000);
COMMENT ON COLUMN pgvpn.limits.carry_bytes IS
    'Largest batch (payload bytes) whose sealed rows also ride in its notification, so that '
    'receivers need no fetch; 0: never. At most 5000 (base64 stays under NOTIFY''s 8000).';

CREATE OR REPLACE FUNCTION pgvpn.send_batch(
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
SET search_path = pg_catalog, pgvpn, pg_temp
AS $$
DECLARE
    n integer := cardinality(r_dst);
    nl integer := cardinality(l_dst);
    max_rows integer;
    max_bytes bigint;
    max_row integer;
    carry integer;
    size bigint;
    header integer;
    biggest integer;
    lying boolean;
    bad boolean;
    advanced integer;
    used bigint;
    quota bigint;
    today date := (statement_timestamp() AT TIME ZONE 'UTC')::date;
BEGIN
    IF p_src IS NULL OR p_src IS DISTINCT FROM pgvpn.my_peer() THEN
        RAISE EXCEPTION 'pgvpn: role % may only send as its own peer', session_user
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF p_notify IS NULL OR n IS NULL OR nl IS NULL OR cardinality(c_src) IS NULL
       OR ARRAY[cardinality(r_seq), cardinality(r_sent_at), cardinality(r_version),
                cardinality(r_src_addr), cardinality(r_dst_addr), cardinality(r_protocol),
                cardinality(r_src_port), cardinality(r_dst_port), cardinality(r_length),
                cardinality(r_fragment), cardinality(r_payload), cardinality(r_offload)]
          IS DISTINCT FROM array_fill(n, ARRAY[12])
       OR cardinality(l_first) IS DISTINCT FROM nl OR cardinality(l_last) IS DISTINCT FROM nl
       OR cardinality(c_last) IS DISTINCT FROM cardinality(c_src)
       OR greatest(array_ndims(l_dst), array_ndims(l_first), array_ndims(l_last),
                   array_ndims(r_dst), array_ndims(r_seq), array_ndims(r_payload),
                   array_ndims(r_offload), array_ndims(c_src), array_ndims(c_last)) > 1
       OR array_position(c_src, NULL) IS NOT NULL OR array_position(c_last, NULL) IS NOT NULL
    THEN
        RAISE EXCEPTION 'pgvpn: send_batch arrays are NULL, nested or of unequal lengths'
            USING ERRCODE = 'PV003';
    END IF;
    -- One statement for the limits, the caller's quota, the batch's size and its sequence
    -- numbers (one pass over the rows for sizes and headers: each aggregate of its own was a
    -- plan node to start per call). Per link: the rows inside [first, last] number exactly
    -- last - first + 1, and together they are every row; with the primary key (no duplicate
    -- seq in one statement) that makes each link's rows exactly first..last.
    SELECT m.batch_rows, m.batch_bytes, m.row_bytes, m.carry_bytes,
           coalesce(p.bytes_per_day, m.peer_bytes_per_day),
           r.size, r.header, r.biggest, r.lying,
           (SELECT coalesce(sum(s.rows), 0) <> n
                   OR coalesce(bool_or(s.dst IS NULL OR s.first IS NULL OR s.last < s.first
                                       OR s.rows <> s.last - s.first + 1), false)
            FROM (SELECT l.dst, l.first, l.last, count(r.seq) AS rows
                  FROM unnest(l_dst, l_first, l_last) AS l (dst, first, last)
                  LEFT JOIN unnest(r_dst, r_seq) AS r (dst, seq)
                         ON r.dst = l.dst AND r.seq BETWEEN l.first AND l.last
                  GROUP BY l.dst, l.first, l.last) AS s)
    INTO max_rows, max_bytes, max_row, carry, quota, size, header, biggest, lying, bad
    FROM pgvpn.limits m, pgvpn.peer p,
         -- the header columns must describe the packet: its family, and its length (the
         -- payload, or the payload sealed: 29 bytes more), so the log's byte counts hold
         (SELECT coalesce(sum(octet_length(x.payload)), 0)
                 + coalesce(sum(octet_length(x.offload)), 0) AS size,
                 coalesce(max(octet_length(x.offload)), 0) AS header,
                 coalesce(max(octet_length(x.payload)), 0) AS biggest,
                 coalesce(bool_or(family(x.src) <> x.version OR family(x.dst) <> x.version
                                  OR octet_length(x.payload) - x.length NOT IN (0, 29)),
                          false) AS lying
          FROM unnest(r_payload, r_offload, r_src_addr, r_dst_addr, r_version, r_length)
               AS x (payload, offload, src, dst, version, length)) AS r
    WHERE p.id = p_src;
    IF n > max_rows OR size > max_bytes THEN
        RAISE EXCEPTION 'pgvpn: a batch of % rows and % bytes is over the limits of % and % '
            '(pgvpn.limits)', n, size, max_rows, max_bytes USING ERRCODE = 'PV003';
    END IF;
    IF bad THEN
        RAISE EXCEPTION 'pgvpn: rows of a batch must be each link''s sequence numbers first..last'
            USING ERRCODE = 'PV003';
    END IF;
    IF biggest > max_row THEN
        RAISE EXCEPTION 'pgvpn: a row of % bytes is over the limit of % (pgvpn.limits)',
            biggest, max_row USING ERRCODE = 'PV003';
    END IF;
    IF lying THEN
        RAISE EXCEPTION 'pgvpn: a row''s ip_version, addresses or length do not describe its '
            'payload' USING ERRCODE = 'PV003';
    END IF;
    IF header > 12 THEN
        RAISE EXCEPTION 'pgvpn: an offload header is a virtio_net_hdr of at most 12 bytes, not %',
            header USING ERRCODE = 'PV003';
    END IF;
    -- (a batch that began before midnight and locks the row after the next day's first batch
    -- counts into that day: the day never goes back)
    UPDATE pgvpn.usage u
    SET day = greatest(u.day, today),
        bytes = CASE WHEN u.day >= today THEN u.bytes ELSE 0 END + size + 100 * n,
        rows = CASE WHEN u.day >= today THEN u.rows ELSE 0 END + n
    WHERE u.peer = p_src
    RETURNING u.bytes INTO used;
    IF NOT FOUND THEN
        INSERT INTO pgvpn.usage (peer, day, bytes, rows)
        VALUES (p_src, today, size + 100 * n, n) RETURNING bytes INTO used;
    END IF;
    IF used > quota THEN
        RAISE EXCEPTION 'pgvpn: peer % is over its daily log quota of % bytes', p_src, quota
            USING ERRCODE = 'PV002';
    END IF;
    UPDATE pgvpn.link l SET tx_seq = v.last, tx_at = statement_timestamp()
    FROM unnest(l_dst, l_first, l_last) AS v (dst, first, last)
    WHERE l.src = p_src AND l.dst = v.dst AND l.tx_seq = v.first - 1;
    GET DIAGNOSTICS advanced = ROW_COUNT;
    IF advanced <> nl THEN
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
        FROM unnest(c_src, c_last) AS v (src, last), pgvpn.link l
        WHERE c.dst = p_src AND c.src = v.src AND c.rx_seq < v.last
          AND l.src = v.src AND l.dst = p_src AND v.last <= l.tx_seq;
    END IF;
    IF p_notify AND size > carry THEN
        PERFORM pg_notify(p.channel, p_src || ':' || v.last)
        FROM unnest(l_dst, l_last) AS v (dst, last) JOIN pgvpn.peer p ON p.id = v.dst;
    ELSIF p_notify THEN
        -- A small batch: each link's rows ride along when every one of them is sealed (the
        -- rows just inserted, in sequence order, each with its offload header after a '.' if
        -- it has one; "src:last" alone otherwise). The sequence numbers make each text
        -- distinct: none collapses.
        PERFORM pg_notify(p.channel, p_src || ':' || v.last || coalesce(':' || c.rows, ''))
        FROM unnest(l_dst, l_last) AS v (dst, last)
        JOIN pgvpn.peer p ON p.id = v.dst
        LEFT JOIN LATERAL (
            SELECT string_agg(translate(encode(r.payload, 'base64')
                                        || coalesce('.' || encode(r.offload, 'base64'), ''),
                                        E'\n', ''), ',' ORDER BY r.seq) AS rows
            FROM unnest(r_dst, r_seq, r_length, r_payload, r_offload)
                 AS r (dst, seq, length, payload, offload)
            WHERE r.dst = v.dst
            HAVING bool_and(octet_length(r.payload) = r.length + 29)
        ) AS c ON true;
    END IF;
END
$$;
