"""Test helpers shipped with dsrflow, so services test their own workers the way dsrflow tests itself.

- :mod:`dsrflow.testing.worker`: ``run_task`` / ``make_task``: a task through a worker's handlers, no Kafka;
- :mod:`dsrflow.testing.brokers`: ``start_test_broker``: Apache Kafka, Tansu or an external broker;
- :mod:`dsrflow.testing.conformance`: ``Conformance`` / ``assert_conformant`` / ``CHECKS``: the worker
  contract (export finds the subject, a second erasure is not_found, retained data has a legal basis,
  conflicting identifiers give conflict, a redelivered task changes nothing), run on your own worker;
- :mod:`dsrflow.testing.broken`: workers that break that contract, each caught by a check, and one that keeps it.
"""
