"""Test helpers shipped with dsrflow, so services test their own workers the way dsrflow tests itself.

- :mod:`dsrflow.testing.worker`: ``run_task`` / ``run_tasks`` / ``make_task``: tasks through a worker's
  handlers (batch handlers too), no Kafka;
- :mod:`dsrflow.testing.brokers`: ``start_test_broker``: Apache Kafka, Tansu or an external broker;
- :mod:`dsrflow.testing.conformance`: ``Conformance`` / ``assert_conformant`` / ``CHECKS``: the worker
  contract (export finds the subject, a second erasure is not_found, retained data has a legal basis,
  conflicting identifiers give conflict, a redelivered task changes nothing), run on your own worker
  in-process, or over Kafka on a running worker in any language (``Conformance.over_kafka``, and
  ``python -m dsrflow.testing.conformance`` from the command line);
- :mod:`dsrflow.testing.broken`: workers that break that contract, each caught by a check, and one that keeps it.
"""
