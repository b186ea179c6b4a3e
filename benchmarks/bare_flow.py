"""The yardstick for a cached re-run: a bare three-task Prefect flow in the same environment."""

from flows.env import prepare_environment

prepare_environment()

from prefect import flow, task  # noqa: E402


@task
def step(x: int) -> int:
    return x + 1


@flow(name="bare-three-tasks")
def bare() -> int:
    return step(step(step(0)))


if __name__ == "__main__":
    print(bare())
