-- pgvpn schema v11: the database is the trust boundary; a peer's login reaches its own traffic
-- and nothing else (docs/security.md).
--
-- Runs as pgvpn_owner, a NOLOGIN role that is not a superuser: schema.py first makes it own
-- every object here and hardens the database itself (TEMPORARY, the advisory-lock and
-- large-object functions of pg_catalog, default privileges), which only a superuser may do.
--
-- Every SECURITY DEFINER function below: its search_path ends in pg_temp, so a caller's
-- temporary objects can never shadow a name it uses (DESIGN.md trap 12), and catalog names are
-- qualified. EXECUTE is granted per role; nothing is executable by PUBLIC.

-- Peers: names that would collide with the project's own roles are refused; each peer gets a
-- secret NOTIFY channel that only it learns (my_channel()), so no one else can LISTEN to its
-- wake-ups; a revoked peer keeps its rows but its login maps to no peer.
DO $$
DECLARE
    taken text;
BEGIN
    SELECT string_agg(name, ', ') INTO taken FROM pgvpn.peer
    WHERE db_role IN ('pgvpn_agent', 'pgvpn_reader', 'pgvpn_operator', 'pgvpn_owner',
                      'pgvpn_housekeeping', 'pgvpn_metrics');
    IF taken IS NOT NULL THEN
        RAISE EXCEPTION 'pgvpn: peers named % have a login role that is one of pgvpn''s own '
            'roles; rename them (a new name, new credentials) before upgrading', taken
            USING ERRCODE = 'PV003';
    END IF;
END
$$;
ALTER TABLE pgvpn.peer ADD CONSTRAINT peer_name_not_reserved CHECK (db_role NOT IN (
    'pgvpn_agent', 'pgvpn_reader', 'pgvpn_operator', 'pgvpn_owner', 'pgvpn_housekeeping',
    'pgvpn_metrics'));
ALTER TABLE pgvpn.peer
    ADD COLUMN channel text NOT NULL UNIQUE
        DEFAULT 'pgvpn_' || replace(gen_random_uuid()::text, '-', ''),
    ADD COLUMN revoked_at timestamptz,
    ADD COLUMN bytes_per_day bigint CHECK (bytes_per_day >= 0);
COMMENT ON COLUMN pgvpn.peer.channel IS
    'Secret NOTIFY channel of this peer''s receiver; only its own peer learns it (my_channel()).';
COMMENT ON COLUMN pgvpn.peer.revoked_at IS
    'Set by `pgvpn db revoke`: the login maps to no peer any more (my_peer() is NULL).';
COMMENT ON COLUMN pgvpn.peer.bytes_per_day IS
    'This peer''s daily log quota in charged bytes; NULL: pgvpn.limits.peer_bytes_per_day.';

-- No column statistics on the log but its time: the planner's estimates, which EXPLAIN shows to
-- anyone who may query the table, would tell a peer how much each peer sends and receives, and
-- to which addresses and ports. Inserts and the receivers' indexed reads do not need them; a
-- `pgvpn log` filter on a closed day still finds its index. (schema.py removes statistics an
-- earlier version gathered; ensure_partitions() sets the same on every new day.)
CREATE FUNCTION pgvpn.hide_statistics(rel regclass)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pgvpn, pg_temp
AS $$
DECLARE
    col text;
BEGIN
    FOR col IN SELECT a.attname FROM pg_catalog.pg_attribute a
               WHERE a.attrelid = rel AND a.attnum > 0 AND NOT a.attisdropped
                 AND a.attname <> 'logged_at' LOOP
        EXECUTE format('ALTER TABLE %s ALTER COLUMN %I SET STATISTICS 0', rel, col);
    END LOOP;
END
$$;
COMMENT ON FUNCTION pgvpn.hide_statistics(regclass) IS
    'No planner statistics on a table''s columns but logged_at (they would leak volumes).';
SELECT pgvpn.hide_statistics('pgvpn.packet'::regclass);
-- the links' counters (every batch's tx_seq, every cursor) likewise: a peer would read other
-- links' counts from estimates over pgvpn.link and pgvpn.cursor
SELECT pgvpn.hide_statistics('pgvpn.link'::regclass);
SELECT pgvpn.hide_statistics('pgvpn.cursor'::regclass);
SELECT pgvpn.hide_statistics(i.inhrelid::regclass) FROM pg_catalog.pg_inherits i
WHERE i.inhparent = 'pgvpn.packet'::regclass;

-- What one call of send_batch() may carry, and each peer's share of the log per day (UTC).
CREATE TABLE pgvpn.limits (
    only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    batch_rows integer NOT NULL DEFAULT 10000 CHECK (batch_rows > 0),
    batch_bytes bigint NOT NULL DEFAULT 8388608 CHECK (batch_bytes > 0),
    -- a 64 KB TSO burst sealed (29 bytes): a receiver's page of fetch_max rows stays bounded
    row_bytes integer NOT NULL DEFAULT 65600 CHECK (row_bytes > 0),
    peer_bytes_per_day bigint CHECK (peer_bytes_per_day >= 0)
);
INSERT INTO pgvpn.limits DEFAULT VALUES;
COMMENT ON TABLE pgvpn.limits IS 'Bounds checked by send_batch() on every call (one row).';
COMMENT ON COLUMN pgvpn.limits.peer_bytes_per_day IS
    'Daily log quota per sending peer in charged bytes (payload and offload header + 100 per '
    'row); NULL: none.';

CREATE TABLE pgvpn.usage (
    peer smallint PRIMARY KEY REFERENCES pgvpn.peer (id),
    day date NOT NULL DEFAULT (now() AT TIME ZONE 'UTC')::date,
    bytes bigint NOT NULL DEFAULT 0,
    rows bigint NOT NULL DEFAULT 0
) WITH (fillfactor = 20);
COMMENT ON TABLE pgvpn.usage IS
    'What each peer logged on its current day (UTC): charged bytes and rows, for the quota.';
INSERT INTO pgvpn.usage (peer) SELECT id FROM pgvpn.peer;

-- The caller's peer: its login role, unless revoked. Policies and send_batch() key on it.
CREATE OR REPLACE FUNCTION pgvpn.my_peer()
RETURNS smallint
LANGUAGE plpgsql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pgvpn, pg_temp
AS $$
BEGIN
    RETURN (SELECT p.id FROM pgvpn.peer p
            WHERE p.db_role = session_user AND p.revoked_at IS NULL);
END
$$;

CREATE FUNCTION pgvpn.my_channel()
RETURNS text
LANGUAGE sql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pgvpn, pg_temp
AS $$ SELECT p.channel FROM pgvpn.peer p WHERE p.id = pgvpn.my_peer() $$;

-- An agent's "I am the only one running as this peer" locks, one per direction, keyed on its
-- own peer id: peers cannot call pg_advisory_* themselves, so no one can squat another peer's
-- key. Each agent process names itself with a random token: a lock held under the caller's own
-- token is its own session from before a reconnect, left behind on a dead path (the server keeps
-- it, and its lock, until it notices): lock_peer() returns that session's pid, which the agent
-- may end (its own role's backend) before it tries again. A lock held under another token is
-- another agent of the same name. And one process holds both directions or neither: an agent
-- refuses a direction whose other half another process holds.
CREATE TABLE pgvpn.agent_session (
    peer smallint NOT NULL REFERENCES pgvpn.peer (id),
    direction smallint NOT NULL CHECK (direction IN (1, 2)),
    pid integer NOT NULL,
    token text NOT NULL,
    since timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (peer, direction)
);
COMMENT ON TABLE pgvpn.agent_session IS
    'Which backend (and agent process, by its token) holds each peer''s sender (1) and '
    'receiver (2) lock.';

CREATE FUNCTION pgvpn.lock_peer(p_direction smallint, p_token text)
RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pgvpn, pg_temp
AS $$
DECLARE
    me smallint := pgvpn.my_peer();
    holder pgvpn.agent_session;
BEGIN
    IF me IS NULL THEN
        RAISE EXCEPTION 'pgvpn: role % is not a registered peer', session_user
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF p_direction IS NULL OR p_direction NOT IN (1, 2) OR p_token IS NULL
       OR length(p_token) NOT BETWEEN 8 AND 64 THEN
        RAISE EXCEPTION 'pgvpn: lock_peer takes direction 1 (sender) or 2 (receiver) and a '
            'token of 8 to 64 characters' USING ERRCODE = 'PV003';
    END IF;
    -- one lock_peer() of this peer at a time: the other direction's holder has committed its row
    PERFORM pg_catalog.pg_advisory_xact_lock((1886781440::bigint << 16) + me);
    IF NOT pg_catalog.pg_try_advisory_lock(1886781440 + p_direction, me) THEN
        SELECT * INTO holder FROM pgvpn.agent_session s
        WHERE s.peer = me AND s.direction = p_direction;
        -- 0: another process; a pid: this process's own session from before
        RETURN CASE WHEN holder.token = p_token THEN holder.pid ELSE 0 END;
    END IF;
    -- the other direction: held now, by a live backend, of another process?
    SELECT s.* INTO holder FROM pgvpn.agent_session s
    JOIN pg_catalog.pg_locks l ON l.pid = s.pid AND l.locktype = 'advisory' AND l.granted
         AND l.classid = 1886781440 + s.direction AND l.objid = me
         AND l.database = (SELECT d.oid FROM pg_catalog.pg_database d
                           WHERE d.datname = pg_catalog.current_database())
    WHERE s.peer = me AND s.direction = 3 - p_direction;
    IF FOUND AND holder.token <> p_token THEN
        PERFORM pg_catalog.pg_advisory_unlock(1886781440 + p_direction, me);
        RETURN 0;
    END IF;
    INSERT INTO pgvpn.agent_session AS s (peer, direction, pid, token)
    VALUES (me, p_direction, pg_catalog.pg_backend_pid(), p_token)
    ON CONFLICT (peer, direction) DO UPDATE
        SET pid = excluded.pid, token = excluded.token, since = now();
    RETURN -1;
END
$$;

-- The database lost commits the sender saw (highwater.py): its link continues after them, so
-- that no sequence number a receiver may have passed is used again. Forward only, own links.
-- Every advance is recorded: a hole a receiver counts is either the database's loss or a
-- sender's advance, and an operator tells them apart here (a peer can make holes on its own
-- links, nowhere else).
CREATE TABLE pgvpn.link_advance (
    src smallint NOT NULL,
    dst smallint NOT NULL,
    from_seq bigint NOT NULL,
    to_seq bigint NOT NULL,
    at timestamptz NOT NULL DEFAULT now(),
    FOREIGN KEY (src, dst) REFERENCES pgvpn.link (src, dst)
);
COMMENT ON TABLE pgvpn.link_advance IS
    'Each time a sender moved its link past sequence numbers the database had lost.';

CREATE FUNCTION pgvpn.advance_link(p_dst smallint, p_seq bigint)
RETURNS boolean
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pgvpn, pg_temp
AS $$
DECLARE
    was bigint;
BEGIN
    SELECT l.tx_seq INTO was FROM pgvpn.link l
    WHERE l.src = pgvpn.my_peer() AND l.dst = p_dst FOR UPDATE;
    IF was IS NULL OR p_seq IS NULL OR was >= p_seq THEN
        RETURN false;
    END IF;
    UPDATE pgvpn.link l SET tx_seq = p_seq, tx_at = statement_timestamp()
    WHERE l.src = pgvpn.my_peer() AND l.dst = p_dst;
    INSERT INTO pgvpn.link_advance (src, dst, from_seq, to_seq)
    VALUES (pgvpn.my_peer(), p_dst, was, p_seq);
    RETURN true;
END
$$;

-- One batch from one sender, in one transaction. Everything a caller passes is checked here,
-- where a peer that bypasses its agent cannot skip it: the caller sends as itself, the arrays
-- agree in length and stay within pgvpn.limits, every row belongs to one of the batch's links
-- and each link's rows are exactly first..last (continuing tx_seq: a sequence never goes back
-- or skips), the caller's daily quota holds; then the links advance, the rows are inserted,
-- the caller's receiver cursors move forward (never past what was sent), each receiver is woken.
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
    -- numbers. Per link: the rows inside [first, last] number exactly last - first + 1, and
    -- together they are every row; with the primary key (no duplicate seq in one statement)
    -- that makes each link's rows exactly first..last.
    SELECT m.batch_rows, m.batch_bytes, m.row_bytes, coalesce(p.bytes_per_day, m.peer_bytes_per_day),
           (SELECT coalesce(sum(octet_length(x)), 0) FROM unnest(r_payload) AS x)
           + (SELECT coalesce(sum(octet_length(o)), 0) FROM unnest(r_offload) AS o),
           (SELECT coalesce(max(octet_length(o)), 0) FROM unnest(r_offload) AS o),
           (SELECT coalesce(max(octet_length(x)), 0) FROM unnest(r_payload) AS x),
           -- the header columns must describe the packet: its family, and its length (the
           -- payload, or the payload sealed: 29 bytes more), so the log's byte counts hold
           (SELECT coalesce(bool_or(family(r.src) <> r.version OR family(r.dst) <> r.version
                                    OR octet_length(r.payload) - r.length NOT IN (0, 29)), false)
            FROM unnest(r_src_addr, r_dst_addr, r_version, r_length, r_payload)
                 AS r (src, dst, version, length, payload)),
           (SELECT coalesce(sum(s.rows), 0) <> n
                   OR coalesce(bool_or(s.dst IS NULL OR s.first IS NULL OR s.last < s.first
                                       OR s.rows <> s.last - s.first + 1), false)
            FROM (SELECT l.dst, l.first, l.last, count(r.seq) AS rows
                  FROM unnest(l_dst, l_first, l_last) AS l (dst, first, last)
                  LEFT JOIN unnest(r_dst, r_seq) AS r (dst, seq)
                         ON r.dst = l.dst AND r.seq BETWEEN l.first AND l.last
                  GROUP BY l.dst, l.first, l.last) AS s)
    INTO max_rows, max_bytes, max_row, quota, size, header, biggest, lying, bad
    FROM pgvpn.limits m, pgvpn.peer p
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
    IF p_notify THEN
        PERFORM pg_notify(p.channel, p_src || ':' || v.last)
        FROM unnest(l_dst, l_last) AS v (dst, last) JOIN pgvpn.peer p ON p.id = v.dst;
    END IF;
END
$$;

-- Seed v1 behaviour ("trigger" mode): as schema v1, on the receiver's secret channel. Runs as
-- send_batch()'s owner: no EXECUTE right is needed for a trigger to fire.
CREATE OR REPLACE FUNCTION pgvpn.notify_row()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pgvpn, pg_temp
AS $$
BEGIN
    PERFORM pg_notify(p.channel, NEW.src_peer || ':' || NEW.seq)
    FROM pgvpn.peer p WHERE p.id = NEW.dst_peer;
    RETURN NULL;
END
$$;

-- Operators register peers (Ansible, `pgvpn db register`, the lab); agents no longer do. At
-- most 1000 names a call; a name that exists consumes no identity value (DESIGN.md trap 15).
-- A revoked peer named again stays revoked: only an operator clearing revoked_at restores it.
CREATE OR REPLACE FUNCTION pgvpn.register_peers(names text[])
RETURNS TABLE (name text, id smallint)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pgvpn, pg_temp
AS $$
#variable_conflict use_column
BEGIN
    IF names IS NULL OR cardinality(names) > 1000 OR array_position(names, NULL) IS NOT NULL THEN
        RAISE EXCEPTION 'pgvpn: register_peers takes 1 to 1000 names, none NULL'
            USING ERRCODE = 'PV003';
    END IF;
    INSERT INTO pgvpn.peer (name)
        SELECT DISTINCT n FROM unnest(names) AS n
        WHERE NOT EXISTS (SELECT FROM pgvpn.peer p WHERE p.name = n)
        ON CONFLICT DO NOTHING;
    -- a link each way between every named peer and every other peer not revoked: the mesh
    INSERT INTO pgvpn.link (src, dst)
        SELECT a.id, b.id FROM pgvpn.peer a, pgvpn.peer b
        WHERE a.id <> b.id AND (a.name = ANY (names) OR b.name = ANY (names))
          AND a.revoked_at IS NULL AND b.revoked_at IS NULL
        ON CONFLICT DO NOTHING;
    INSERT INTO pgvpn.cursor (src, dst) SELECT l.src, l.dst FROM pgvpn.link l
        ON CONFLICT DO NOTHING;
    INSERT INTO pgvpn.usage (peer) SELECT p.id FROM pgvpn.peer p ON CONFLICT DO NOTHING;
    RETURN QUERY SELECT p.name, p.id FROM pgvpn.peer p WHERE p.name = ANY (names);
END
$$;

-- Partitions ahead: at most 31 days, and never queued for long behind a lock (a pg_dump or a
-- long query holding pgvpn.packet): inserts would queue behind the waiting CREATE.
CREATE OR REPLACE FUNCTION pgvpn.ensure_partitions(days_ahead integer DEFAULT 7)
RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pgvpn, pg_temp
SET lock_timeout = '500ms'
AS $$
DECLARE
    today date := (now() AT TIME ZONE 'UTC')::date;
    d date;
    part text;
    created integer := 0;
BEGIN
    IF days_ahead IS NULL OR days_ahead NOT BETWEEN 0 AND 31 THEN
        RAISE EXCEPTION 'pgvpn: ensure_partitions makes 0 to 31 days ahead'
            USING ERRCODE = 'PV003';
    END IF;
    PERFORM pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtext('pgvpn.ensure_partitions'));
    FOR i IN 0..days_ahead LOOP
        d := today + i;
        part := 'packet_' || to_char(d, 'YYYYMMDD');
        CONTINUE WHEN to_regclass('pgvpn.' || part) IS NOT NULL;
        BEGIN
            EXECUTE format(
                'CREATE TABLE pgvpn.%I PARTITION OF pgvpn.packet FOR VALUES FROM (%L) TO (%L)',
                part, d::timestamp AT TIME ZONE 'UTC', (d + 1)::timestamp AT TIME ZONE 'UTC');
            EXECUTE format('ALTER TABLE pgvpn.%I ALTER COLUMN payload SET STORAGE EXTERNAL', part);
            PERFORM pgvpn.hide_statistics(format('pgvpn.%I', part)::regclass);
            created := created + 1;
        EXCEPTION WHEN check_violation THEN
            RAISE WARNING 'pgvpn: partition % not created, rows for it are in packet_default', part;
        END;
    END LOOP;
    RETURN created;
END
$$;

CREATE OR REPLACE FUNCTION pgvpn.partitions()
RETURNS TABLE (partition text, day date, bytes bigint)
LANGUAGE sql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pgvpn, pg_temp
AS $$
    SELECT c.relname::text, pg_catalog.to_date(substring(c.relname FROM 8), 'YYYYMMDD'),
           pg_catalog.pg_total_relation_size(c.oid)
    FROM pg_catalog.pg_inherits i JOIN pg_catalog.pg_class c ON c.oid = i.inhrelid
    WHERE i.inhparent = 'pgvpn.packet'::pg_catalog.regclass
      AND c.relname ~ '^packet_[0-9]{8}$'
    ORDER BY 2
$$;

-- Retention as in schema v4, bounded, and honest about what it drops: rows no receiver has
-- read yet (seq past its cursor; a receiver long offline, a removed peer) are counted per
-- partition, so that an operator hears of them (housekeeping logs and counts them).
DROP FUNCTION pgvpn.apply_retention(integer, bigint);
CREATE FUNCTION pgvpn.apply_retention(keep_days integer, max_bytes bigint DEFAULT NULL)
RETURNS TABLE (partition text, day date, bytes bigint, reason text, undelivered bigint)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pgvpn, pg_temp
SET lock_timeout = '200ms'
AS $$
DECLARE
    today date := (now() AT TIME ZONE 'UTC')::date;
    total bigint;
    p record;
BEGIN
    IF keep_days < 0 OR max_bytes < 0 THEN
        RAISE EXCEPTION 'pgvpn: apply_retention takes keep_days >= 0 and max_bytes >= 0'
            USING ERRCODE = 'PV003';
    END IF;
    IF NOT pg_catalog.pg_try_advisory_xact_lock(pg_catalog.hashtext('pgvpn.apply_retention')) THEN
        RETURN;
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
        EXECUTE format('SELECT count(*) FROM pgvpn.%I r JOIN pgvpn.cursor c '
                       'ON c.src = r.src_peer AND c.dst = r.dst_peer WHERE r.seq > c.rx_seq',
                       p.partition) INTO undelivered;
        EXECUTE format('DROP TABLE pgvpn.%I', p.partition);
        total := total - p.bytes;
        partition := p.partition;
        day := p.day;
        bytes := p.bytes;
        RETURN NEXT;
    END LOOP;
END
$$;

-- Closed days' address and port indexes lead with the receiving peer: a peer's read of the log
-- (row-level security: dst_peer is the caller) then never visits another peer's rows, which
-- EXPLAIN ANALYZE would count ("Rows Removed by Filter": who sent how much to an address or a
-- port). Operators' filters name every peer (logquery.py). Schema v6's one-column indexes go.
DO $$
DECLARE
    i record;
BEGIN
    FOR i IN SELECT c.relname FROM pg_catalog.pg_class c
             WHERE c.relnamespace = 'pgvpn'::regnamespace AND c.relkind = 'i'
               AND c.relname ~ '^packet_[0-9]{8}_(src_addr|dst_addr|src_port|dst_port)$' LOOP
        EXECUTE format('DROP INDEX pgvpn.%I', i.relname);
    END LOOP;
END
$$;

CREATE OR REPLACE FUNCTION pgvpn.index_closed_days()
RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pgvpn, pg_temp
SET lock_timeout = '200ms'
AS $$
DECLARE
    today date := (now() AT TIME ZONE 'UTC')::date;
    p record;
    col text;
    made integer := 0;
BEGIN
    IF NOT pg_catalog.pg_try_advisory_xact_lock(pg_catalog.hashtext('pgvpn.index_closed_days'))
    THEN
        RETURN 0;
    END IF;
    FOR p IN SELECT t.partition FROM pgvpn.partitions() t WHERE t.day < today ORDER BY t.day LOOP
        FOREACH col IN ARRAY ARRAY['src_addr', 'dst_addr', 'src_port', 'dst_port'] LOOP
            IF to_regclass(format('pgvpn.%I', p.partition || '_' || col)) IS NULL THEN
                EXECUTE format('CREATE INDEX %I ON pgvpn.%I (dst_peer, %I)',
                               p.partition || '_' || col, p.partition, col);
                made := made + 1;
            END IF;
        END LOOP;
    END LOOP;
    RETURN made;
END
$$;

-- Row-level security binds the owner too (FORCE), so that the definer functions are held to
-- the caller's identity as well: send_batch() may insert only rows of the calling peer and
-- advance only its links, move only its cursors. Views and housekeeping read everything.
ALTER TABLE pgvpn.packet FORCE ROW LEVEL SECURITY;
ALTER TABLE pgvpn.link FORCE ROW LEVEL SECURITY;
ALTER TABLE pgvpn.cursor FORCE ROW LEVEL SECURITY;
-- (The caller's peer is written out, not my_peer(): a subquery is part of the statement's
-- cached plan, a function call is not.)
CREATE POLICY owner_reads ON pgvpn.packet FOR SELECT TO pgvpn_owner USING (true);
CREATE POLICY sender_inserts ON pgvpn.packet FOR INSERT TO pgvpn_owner
    WITH CHECK (src_peer = (SELECT p.id FROM pgvpn.peer p
                            WHERE p.db_role = session_user AND p.revoked_at IS NULL));
CREATE POLICY owner_reads ON pgvpn.link FOR SELECT TO pgvpn_owner USING (true);
CREATE POLICY owner_registers ON pgvpn.link FOR INSERT TO pgvpn_owner WITH CHECK (true);
CREATE POLICY sender_advances ON pgvpn.link FOR UPDATE TO pgvpn_owner
    USING (src = (SELECT p.id FROM pgvpn.peer p
                  WHERE p.db_role = session_user AND p.revoked_at IS NULL))
    WITH CHECK (src = (SELECT p.id FROM pgvpn.peer p
                       WHERE p.db_role = session_user AND p.revoked_at IS NULL));
CREATE POLICY owner_reads ON pgvpn.cursor FOR SELECT TO pgvpn_owner USING (true);
CREATE POLICY owner_registers ON pgvpn.cursor FOR INSERT TO pgvpn_owner WITH CHECK (true);
CREATE POLICY receiver_saves ON pgvpn.cursor FOR UPDATE TO pgvpn_owner
    USING (dst = (SELECT p.id FROM pgvpn.peer p
                  WHERE p.db_role = session_user AND p.revoked_at IS NULL))
    WITH CHECK (dst = (SELECT p.id FROM pgvpn.peer p
                       WHERE p.db_role = session_user AND p.revoked_at IS NULL));

-- Grants: nothing for PUBLIC; each function to the roles that call it.
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA pgvpn FROM PUBLIC;
REVOKE ALL ON ALL TABLES IN SCHEMA pgvpn FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA pgvpn FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA pgvpn FROM pgvpn_agent, pgvpn_reader;
GRANT EXECUTE ON FUNCTION pgvpn.my_peer(), pgvpn.my_channel(), pgvpn.lock_peer(smallint, text),
    pgvpn.advance_link(smallint, bigint), pgvpn.segments(bytea, integer) TO pgvpn_agent;
GRANT SELECT ON pgvpn.agent_session, pgvpn.link_advance TO pgvpn_reader;
GRANT EXECUTE ON FUNCTION pgvpn.send_batch(smallint, boolean, smallint[], bigint[], bigint[],
    smallint[], bigint[], timestamptz[], smallint[], inet[], inet[], smallint[], integer[],
    integer[], integer[], boolean[], bytea[], bytea[], smallint[], bigint[]) TO pgvpn_agent;
GRANT EXECUTE ON FUNCTION pgvpn.my_peer(), pgvpn.partitions(), pgvpn.segments(bytea, integer)
    TO pgvpn_reader;
GRANT EXECUTE ON FUNCTION pgvpn.register_peers(text[]), pgvpn.ensure_partitions(integer),
    pgvpn.apply_retention(integer, bigint), pgvpn.index_closed_days() TO pgvpn_operator;
GRANT SELECT, UPDATE ON pgvpn.limits TO pgvpn_operator;
GRANT UPDATE (bytes_per_day) ON pgvpn.peer TO pgvpn_operator;
GRANT SELECT ON pgvpn.limits, pgvpn.usage TO pgvpn_reader;
-- The channel column stays with the owner (and superusers): a peer that knew another peer's
-- channel could LISTEN to who sends it what, and when.
REVOKE SELECT ON pgvpn.peer FROM pgvpn_agent, pgvpn_reader;
GRANT SELECT (id, name, db_role, created_at, revoked_at, bytes_per_day) ON pgvpn.peer
    TO pgvpn_agent, pgvpn_reader;
