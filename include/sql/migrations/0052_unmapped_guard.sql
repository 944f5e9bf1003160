-- The unmapped fields of an array of objects are looked for by one jsonpath test per array before any
-- element is expanded, now for every such array (line_items with their taxes and meta_data too, not only
-- arrays whose elements hold columns alone): most records have nothing left below them, and expanding
-- each element to find that out was most of the orders transform's time.
--
-- The test runs in strict mode: in lax mode a filter unwraps an array it is given, so an element that is
-- itself an array (`[[{...}]]`) would be judged by the objects inside it and found to hold nothing to keep.

-- A jsonpath predicate, true when the object `@` (at pattern p_pattern, e.g. 'line_items[]') holds
-- something the mapping does not name, at any depth: a value that is not an object, a key the mapping
-- does not list, a walked field of another type than expected (kept whole), or such a thing below one.
-- NULL when the pattern has something the test cannot express (an array of arrays): no guard then.
CREATE OR REPLACE FUNCTION sync.unmapped_jsonpath(p_entity text, p_pattern text) RETURNS text
LANGUAGE plpgsql STABLE AS $$
DECLARE
    parts text[];
    kid record;
    k text;
    elem_kind text;
    below text;
BEGIN
    SELECT ARRAY['@.type() != "object"', format('exists(@.keyvalue() ? (!(%s)))',
                 COALESCE(string_agg(format('@.key == %s', to_json(c.key)), ' || '), 'false'))]
    INTO parts FROM sync.field_map_children(p_entity, p_pattern) c;
    FOR kid IN SELECT * FROM sync.field_map_children(p_entity, p_pattern) c WHERE c.what IN ('object', 'array') LOOP
        k := to_json(kid.key)::text;  -- a jsonpath key in double quotes, escaped as in JSON
        IF kid.what = 'object' THEN
            below := sync.unmapped_jsonpath(p_entity, kid.pattern);
            IF below IS NULL THEN
                RETURN NULL;
            END IF;
            -- strict: a missing key is an error, unknown in an OR, so it adds nothing (nothing to keep)
            parts := parts || format('@.%s.type() != "object"', k) || format('exists(@.%s ? (%s))', k, below);
        ELSE
            parts := parts || format('@.%s.type() != "array"', k);
            SELECT f.what INTO elem_kind FROM pg_temp.field_map f
             WHERE f.entity = p_entity AND f.pattern = kid.pattern || '[]';
            IF elem_kind IS NULL THEN  -- elements the mapping does not name: any element is kept
                parts := parts || format('exists(@.%s[*])', k);
            ELSIF elem_kind = 'object' THEN
                below := sync.unmapped_jsonpath(p_entity, kid.pattern || '[]');
                IF below IS NULL THEN
                    RETURN NULL;
                END IF;
                parts := parts || format('exists(@.%s[*] ? (%s))', k, below);
            ELSIF elem_kind <> 'column' THEN
                RETURN NULL;
            END IF;
        END IF;
    END LOOP;
    RETURN array_to_string(parts, ' || ');
END $$;

-- As in 0050, with the guard above on every array of objects.
CREATE OR REPLACE FUNCTION sync.unmapped_below(p_entity text, p_pattern text, p_kind text, p_value text,
                                               p_path text, p_depth int DEFAULT 0) RETURNS text
LANGUAGE plpgsql STABLE AS $$
DECLARE
    parts text[] := '{}';
    kid record;
    cols text[];
    walked text;
    elem_kind text;
    alias text := 'a' || p_depth;
    elem text;
    inner_sql text;
    guard text := '';
    test text;
BEGIN
    IF p_kind = 'object' THEN
        SELECT COALESCE(array_agg(c.key) FILTER (WHERE c.what = 'column'), '{}'),
               'CASE x.key ' || string_agg(format('WHEN %L THEN %L', c.key, c.what), ' ')
                   FILTER (WHERE c.what IN ('object', 'array')) || ' END'
        INTO cols, walked FROM sync.field_map_children(p_entity, p_pattern) c;
        -- a field the mapping walks into is kept whole when it is not the object or array expected
        parts := parts || format(
            'SELECT %s || ''.'' || x.key, x.value FROM jsonb_each(CASE WHEN jsonb_typeof(%s) = ''object'' '
            'THEN NULLIF(%s - %L::text[], ''{}'') END) x WHERE jsonb_typeof(x.value) IS DISTINCT FROM %s',
            p_path, p_value, p_value, cols, COALESCE(walked, 'NULL'));
        FOR kid IN SELECT * FROM sync.field_map_children(p_entity, p_pattern) c WHERE c.what IN ('object', 'array') LOOP
            parts := parts || sync.unmapped_below(p_entity, kid.pattern, kid.what, format('(%s -> %L)', p_value, kid.key),
                                                  format('%s || %L', p_path, '.' || kid.key), p_depth + 1);
        END LOOP;
    ELSE  -- an array: its elements by position
        elem := format('%s || ''['' || (%s.n - 1) || '']''', p_path, alias);
        SELECT f.what INTO elem_kind FROM pg_temp.field_map f WHERE f.entity = p_entity AND f.pattern = p_pattern || '[]';
        IF elem_kind IS NULL THEN  -- elements the mapping does not name: kept whole
            inner_sql := format('SELECT %s, %s.v', elem, alias);
        ELSIF elem_kind = 'object' THEN
            inner_sql := format('SELECT %s, %s.v WHERE jsonb_typeof(%s.v) <> ''object''', elem, alias, alias)
                || ' UNION ALL ' || sync.unmapped_below(p_entity, p_pattern || '[]', 'object', alias || '.v', elem, p_depth + 1);
            -- one jsonpath test (in C, no row per element) says whether any element holds anything to keep
            test := sync.unmapped_jsonpath(p_entity, p_pattern || '[]');
            IF test IS NOT NULL THEN
                guard := format(' AND jsonb_path_exists(%s, %L)', p_value, 'strict $[*] ? (' || test || ')');
            END IF;
        ELSIF elem_kind = 'array' THEN
            inner_sql := format('SELECT %s, %s.v WHERE jsonb_typeof(%s.v) <> ''array''', elem, alias, alias)
                || COALESCE(' UNION ALL ' || sync.unmapped_below(p_entity, p_pattern || '[]', 'array', alias || '.v', elem,
                                                                 p_depth + 1), '');
        ELSE
            RETURN NULL;  -- an array mapped as a column
        END IF;
        parts := parts || format(
            'SELECT s.path, s.value FROM jsonb_array_elements(CASE WHEN jsonb_typeof(%s) = ''array''%s THEN %s END) '
            'WITH ORDINALITY %s(v, n) CROSS JOIN LATERAL (%s) s(path, value)', p_value, guard, p_value, alias, inner_sql);
    END IF;
    RETURN array_to_string(parts, ' UNION ALL ');
END $$;
