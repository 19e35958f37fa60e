"""Test helpers shipped with dsrflow, so services test their own workers the way dsrflow tests itself.

- :mod:`dsrflow.testing.worker`: ``run_task`` / ``make_task``: a task through a worker's handlers, no Kafka;
- :mod:`dsrflow.testing.brokers`: ``start_test_broker``: Apache Kafka, Tansu or an external broker.
"""
