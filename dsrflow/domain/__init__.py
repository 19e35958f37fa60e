"""The pure core: what a case is, which systems get which task, and what a case's outcome is.

No I/O here: :mod:`.planner` decides the tasks of a request, :mod:`.case` holds a case's states and
transitions, each returning the timeline entries and events it causes. The coordinator
(:mod:`dsrflow.coordinator.service`) loads cases, calls these and records what they return in one
transaction with its inbox claim (:mod:`dsrflow.store.cases`).
"""
