"""A school's own catalog declaration, shared by the tests that serve a school's catalog file
(tests/integration/test_catalog_live.py, test_client_recommender.py): its columns (item id,
title, concepts, prerequisites) and three declared features (a category, a multi-valued area,
minutes in buckets), as a school's exercise table exported from a spreadsheet would have."""

from __future__ import annotations

SCHOOL_DECLARATION = """
[item]
id = "Exercise ID"
title = "Title"
concepts = "Concepts"
prerequisites = "Needs"

[features.topic]
column = "Topic"

[features.area]
type = "multi"
column = "Areas"
separator = "|"

[features.minutes]
type = "numeric"
column = "Minutes"
buckets = [10, 20]
"""
