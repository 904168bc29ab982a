"""The one kafka-python private API promptrec reads (`streaming.kafka_python.cached_topic_id`).

Without a broker: a kafka-python release that moves the consumer's cluster metadata or
its `topic_id` lookup fails here, by name, instead of leaving the consumer blind to a
recreated topic. (tests/streaming/test_kafka_client.py reads a real id from a broker.)
"""

from __future__ import annotations

import inspect

from kafka import KafkaConsumer
from kafka.cluster import ClusterMetadata

from streaming.kafka_python import cached_topic_id


def test_the_consumer_still_keeps_topic_ids_in_its_cluster_metadata():
    # api_version given: the constructor connects to nothing.
    consumer = KafkaConsumer(bootstrap_servers="127.0.0.1:1", api_version=(2, 8),
                             client_id="adapter-test")
    try:
        assert isinstance(consumer._client.cluster, ClusterMetadata), \
            "kafka-python moved KafkaConsumer._client.cluster: update cached_topic_id"
        assert list(inspect.signature(ClusterMetadata.topic_id).parameters) == \
            ["self", "topic_name"], "ClusterMetadata.topic_id changed: update cached_topic_id"
        assert cached_topic_id(consumer, "never-seen") == ""  # unknown: no id yet
    finally:
        consumer.close()
