-- The inbox's documents kept inline and uncompressed up to a page (8160 bytes) instead of pglz-compressed
-- past 2 kB: landing paid a compression per document (twice: the page's temp table too, landing.py) and
-- every transform batch a decompression per document, while an order is ~3 kB. The cost is disk: the
-- documents take about twice the room (bench/transform.py prints both). Larger documents are still
-- compressed and moved out of line, as before. Rows landed before keep their compressed form.
ALTER TABLE inbox.record SET (toast_tuple_target = 8160);
