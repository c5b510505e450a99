"""
Consumers (issue #19): a key per team or app, with budgets, rate limits
and usage in a real database.

 - L{openclaw.consumers.model}: consumers, their keys, the rules of both;
 - L{openclaw.consumers.store}: the database (SQLite or PostgreSQL over
   C{twisted.enterprise.adbapi}), its schema and migrations;
 - L{openclaw.consumers.prices}: what a token costs;
 - L{openclaw.consumers.limits}: the per-minute windows and the period's spend;
 - L{openclaw.consumers.table}: the in-memory table the data plane checks,
   and the accounting after each call;
 - L{openclaw.consumers.commands}: the control-plane commands;
 - L{openclaw.consumers.service}: the database while the gateway runs
   (opened and loaded at start, old usage purged, closed at stop).
"""
