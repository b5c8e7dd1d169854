"""Usage limits: rate limits, credits and owner policies (docs/LIMITS.md).

- ``rules``: what a valid limit is, and the no-escalation rule for limits and credits.
- ``allowances``: the verification path's side: units leased from the database, spent from
  memory, and the verdict when none are left.
- ``policies`` and ``credits``: the management RPCs behind owner policies and credit balances.

The SQL (the lease statement included) lives with every other statement, in ``store``.
"""
