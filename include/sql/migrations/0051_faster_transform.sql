-- Text as a person reads it, faster where it has entities (a name like "J&uacute;lia", a line "Hoodie
-- &ndash; Blue": a quarter of the buyers' names): the entities crm.html_decode knows are replaced by
-- replace() calls; a text with any '&' left after that (a literal '&', `&amp;`, another entity) is decoded
-- by crm.html_decode as before. Equal results: an entity never spans another's '&', and none of these
-- replacements yields a character an entity is made of (`&amp;` yields '&': left to crm.html_decode).
CREATE OR REPLACE FUNCTION crm.html_decode_common(t text) RETURNS text LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT replace(replace(replace(replace(replace(replace(replace(replace(replace(replace(replace(replace(replace(replace(replace(replace(replace(replace(replace(replace(replace(replace(replace(replace(replace(replace(replace(replace(replace(replace(replace(replace(replace(replace(replace(replace(replace(replace(replace(t,
           '&lt;', '<'), '&gt;', '>'), '&quot;', '"'), '&apos;', ''''), '&nbsp;', ' '), '&ndash;', '–'),
           '&mdash;', '—'), '&euro;', '€'), '&pound;', '£'), '&aacute;', 'á'), '&eacute;', 'é'), '&iacute;', 'í'),
           '&oacute;', 'ó'), '&uacute;', 'ú'), '&ntilde;', 'ñ'), '&Aacute;', 'Á'), '&Eacute;', 'É'), '&Iacute;', 'Í'),
           '&Oacute;', 'Ó'), '&Uacute;', 'Ú'), '&Ntilde;', 'Ñ'), '&atilde;', 'ã'), '&otilde;', 'õ'), '&ccedil;', 'ç'),
           '&uuml;', 'ü'), '&ouml;', 'ö'), '&auml;', 'ä'), '&rsquo;', '’'), '&lsquo;', '‘'), '&hellip;', '…'),
           '&#039;', ''''), '&#39;', ''''), '&#8211;', '–'), '&#8212;', '—'), '&#8216;', '‘'), '&#8217;', '’'),
           '&#8220;', '“'), '&#8221;', '”'), '&#8230;', '…')
$$;

CREATE OR REPLACE FUNCTION crm.html_text(t text) RETURNS text LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN strpos(t, '&') = 0 THEN t
                WHEN strpos(crm.html_decode_common(t), '&') = 0 THEN crm.html_decode_common(t)
                ELSE crm.html_decode(t) END
$$;
