import boto3


def test_s3_server_round_trip(s3_server, s3_env):
    bucket, prefix = s3_env.removeprefix("s3://").split("/", 1)
    client = boto3.client("s3", endpoint_url=s3_server.endpoint_url, region_name="us-east-1")
    client.put_object(Bucket=bucket, Key=f"{prefix}/hello.txt", Body=b"hello")
    body = client.get_object(Bucket=bucket, Key=f"{prefix}/hello.txt")["Body"].read()
    assert body == b"hello"


def test_postgres_database_is_usable(postgres_url):
    import psycopg2

    with psycopg2.connect(postgres_url) as conn, conn.cursor() as cur:
        cur.execute("select 1 + 1")
        assert cur.fetchone() == (2,)
