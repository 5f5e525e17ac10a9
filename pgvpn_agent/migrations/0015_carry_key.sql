-- Schema v15: small packets of an unsealed pair ride in their notification too, boxed for the
-- receiver with a key of their link.
--
-- v14 let only sealed rows ride along: anyone who knows a receiver's channel may LISTEN to it.
-- A pair that does not seal its payloads still fetched every row it was told about, a round
-- trip per wake-up (0.25-0.35 ms each way of an idle ping here). Now every link has a carry
-- key (pgvpn.carry_key, 64 random bytes made with the link) that only its receiver may read;
-- a small batch's unsealed rows ride as "src:last;box": a random IV and the rows' frames under
-- AES-256-CBC with the key's first half, then HMAC-SHA-256 under its second half over
-- "src:last:dst:timeline:", IV and ciphertext (encrypt-then-MAC, pgcrypto). The database
-- builds the box from the rows it is inserting in the same transaction and sends it once the
-- commit is done: what a receiver delivers from it is what the log holds, logged before it is
-- delivered. A text that does not verify under the receiver's key for that link, position and
-- server timeline (forged, replayed on another link or after a failover that lost rows, a key
-- made anew) sends the receiver to the table, the authority as before. The sender never sees
-- the key; other peers neither see it nor the channel.
--
-- The operator turns it on (pgvpn.limits.carry_unsealed): off by default, because one bulk flow
-- measured 5-10 % slower with it in most side-by-side runs on the development machine.
--
-- pgcrypto is installed by `pgvpn db migrate` (schema.py) in schema pgvpn_crypto, which only
-- the owner may use: no peer can call its functions.

CREATE TABLE pgvpn.carry_key (
    src smallint NOT NULL,
    dst smallint NOT NULL,
    key bytea NOT NULL DEFAULT pgvpn_crypto.gen_random_bytes(64)
        CHECK (octet_length(key) = 64),
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (src, dst),
    FOREIGN KEY (src, dst) REFERENCES pgvpn.link (src, dst) ON DELETE CASCADE
);
COMMENT ON TABLE pgvpn.carry_key IS
    'Per link: the key its small unsealed batches ride in the notification with; only the '
    'receiving peer reads it.';
-- no planner statistics on the keys (EXPLAIN would show what ANALYZE saw)
ALTER TABLE pgvpn.carry_key ALTER COLUMN key SET STATISTICS 0;
ALTER TABLE pgvpn.carry_key ENABLE ROW LEVEL SECURITY;
ALTER TABLE pgvpn.carry_key FORCE ROW LEVEL SECURITY;
CREATE POLICY receiver_reads_own ON pgvpn.carry_key FOR SELECT TO pgvpn_agent
    USING (dst = (SELECT pgvpn.my_peer()));
CREATE POLICY owner_reads ON pgvpn.carry_key FOR SELECT TO pgvpn_owner USING (true);
CREATE POLICY owner_registers ON pgvpn.carry_key FOR INSERT TO pgvpn_owner WITH CHECK (true);
GRANT SELECT ON pgvpn.carry_key TO pgvpn_agent;

-- A new link gets its key (register_peers, a removed peer named again: a new key).
CREATE FUNCTION pgvpn.make_carry_key()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pgvpn, pg_temp
AS $$
BEGIN
    INSERT INTO pgvpn.carry_key (src, dst) VALUES (NEW.src, NEW.dst)
    ON CONFLICT (src, dst) DO NOTHING;
    RETURN NULL;
END
$$;
CREATE TRIGGER link_carry_key AFTER INSERT ON pgvpn.link
    FOR EACH ROW EXECUTE FUNCTION pgvpn.make_carry_key();
INSERT INTO pgvpn.carry_key (src, dst) SELECT l.src, l.dst FROM pgvpn.link l
ON CONFLICT (src, dst) DO NOTHING;

COMMENT ON COLUMN pgvpn.limits.carry_bytes IS
    'Largest batch (payload bytes) whose rows also ride in its notification (sealed rows as '
    'they are, unsealed ones boxed with the link''s carry key if carry_unsealed), so that '
    'receivers need no fetch; 0: never. At most 5000 (base64 stays under NOTIFY''s 8000).';
-- Off until an operator turns it on: one bulk flow measured 5-10 % slower with it in most
-- side-by-side runs here, for a reason not yet found (docs/config.md).
ALTER TABLE pgvpn.limits ADD COLUMN carry_unsealed boolean NOT NULL DEFAULT false;
COMMENT ON COLUMN pgvpn.limits.carry_unsealed IS
    'Whether small batches of unsealed rows ride in their notification, boxed with the '
    'link''s carry key (schema v15); sealed rows ride whenever carry_bytes allows.';

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
    box_unsealed boolean;
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
    SELECT m.batch_rows, m.batch_bytes, m.row_bytes, m.carry_bytes, m.carry_unsealed,
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
    INTO max_rows, max_bytes, max_row, carry, box_unsealed, quota, size, header, biggest, lying,
         bad
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
        -- A small batch: each link's rows ride along in the notification. Sealed rows as they
        -- are logged (v14: "src:last:row,row,...", each base64 with its offload header after a
        -- '.'); unsealed ones boxed for the receiver with the link's carry key (v15:
        -- "src:last;box") if the operator turned that on, or not at all if the link has no
        -- key or the box would not fit NOTIFY.
        -- The rows are those just inserted, in sequence order; the sequence numbers make each
        -- text distinct: none collapses.
        PERFORM pg_notify(x.channel, x.head || coalesce(CASE
                   WHEN x.sealed THEN ':' || x.rows
                   WHEN octet_length(x.box) <= 5900 THEN
                       ';' || translate(encode(x.box || pgvpn_crypto.hmac(
                                  convert_to(x.head || ':' || x.dst || ':' || x.timeline || ':',
                                             'UTF8') || x.box,
                                  substr(x.key, 33, 32), 'sha256'), 'base64'), E'\n', '')
               END, ''))
        FROM (SELECT p.channel, p_src || ':' || v.last AS head, v.dst, k.key, c.sealed, c.rows,
                     -- the server's timeline: a box recorded before a failover that lost
                     -- its rows does not verify after it
                     CASE WHEN box_unsealed THEN pgvpn.timeline() END AS timeline,
                     i.iv || pgvpn_crypto.encrypt_iv(c.frames, substr(k.key, 1, 32), i.iv,
                                                     'aes-cbc/pad:pkcs') AS box
              FROM unnest(l_dst, l_last) AS v (dst, last)
              JOIN pgvpn.peer p ON p.id = v.dst
              LEFT JOIN pgvpn.carry_key k ON k.src = p_src AND k.dst = v.dst
              CROSS JOIN LATERAL (
                  SELECT bool_and(octet_length(r.payload) = r.length + 29) AS sealed,
                         string_agg(translate(encode(r.payload, 'base64')
                                              || coalesce('.' || encode(r.offload, 'base64'), ''),
                                              E'\n', ''), ',' ORDER BY r.seq) AS rows,
                         -- a frame: payload length, then offload header length plus one (0:
                         -- none), both two bytes big-endian, then the payload and the header
                         string_agg(int2send(octet_length(r.payload)::smallint)
                                    || int2send(coalesce(octet_length(r.offload) + 1, 0)::smallint)
                                    || r.payload || coalesce(r.offload, '\x'::bytea), '\x'::bytea
                                    ORDER BY r.seq) FILTER (WHERE box_unsealed) AS frames
                  FROM unnest(r_dst, r_seq, r_length, r_payload, r_offload)
                       AS r (dst, seq, length, payload, offload)
                  WHERE r.dst = v.dst
              ) AS c
              -- one IV per box: volatile, so this subquery is evaluated once per link
              LEFT JOIN LATERAL (
                  SELECT pgvpn_crypto.gen_random_bytes(16) AS iv
                  WHERE box_unsealed AND k.key IS NOT NULL AND NOT c.sealed
              ) AS i ON true
              OFFSET 0) AS x;
    END IF;
END
$$;
