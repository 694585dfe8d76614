"""Helpers of the Lambda and batch tests: a Lambda context and a DynamoDB table."""

from __future__ import annotations

import uuid
from typing import Any

from tests.servers.moto import MotoServer

REGION = "eu-west-1"


class FakeLambdaContext:
    """The attributes of a Lambda context the runtime passes; time left is fixed."""

    function_name = "lambda-app"
    memory_limit_in_mb = 128
    invoked_function_arn = "arn:aws:lambda:eu-west-1:000000000000:function:lambda-app"
    aws_request_id = "00000000-0000-0000-0000-000000000000"

    def __init__(self, remaining_ms: int = 42_000) -> None:
        self.remaining_ms = remaining_ms

    def get_remaining_time_in_millis(self) -> int:
        return self.remaining_ms


def boto(server: MotoServer, service: str) -> Any:
    """A boto3 client of `service` on the moto server."""
    import boto3

    return boto3.client(service, endpoint_url=server.endpoint_url, region_name=REGION)


def create_table(server: MotoServer) -> str:
    """A DynamoDB table as docs/dynamodb.md creates it (partition key ``id``)."""
    name = f"table-{uuid.uuid4().hex[:12]}"
    boto(server, "dynamodb").create_table(
        TableName=name,
        KeySchema=[{"AttributeName": "id", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "id", "AttributeType": "S"}],
        BillingMode="PAY_PER_REQUEST",
    )
    return name
