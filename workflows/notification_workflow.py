"""One order email as a workflow of its own, so that a mail outage never holds an order open."""

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from activities.order_activities import OrderActivities
    from workflows.models import Notification

NOTIFICATION_WORKFLOW_NAME = "NotificationWorkflow"
# Retried until the mail server takes it, however long it is down; a
# recipient refused for good (5xx) fails the workflow, for a person to see.
EMAIL_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(minutes=1),
    maximum_attempts=0,
)


@workflow.defn(name=NOTIFICATION_WORKFLOW_NAME)
class NotificationWorkflow:
    @workflow.run
    async def run(self, notification: Notification) -> None:
        await workflow.execute_activity_method(
            OrderActivities.send_notification,
            notification,
            start_to_close_timeout=timedelta(seconds=30),
            retry_policy=EMAIL_RETRY,
        )
