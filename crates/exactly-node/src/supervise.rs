//! Supervision of a node's long-lived tasks (the servers, the lease loop, the leadership
//! watcher, the proposal and submit queues, the reloaders…). A panic in one is a bug that would
//! leave the node half alive: serving nothing while it still renews its lease, or renewing
//! nothing while it still serves. So a task that panics while the node runs stops the whole
//! node, loudly (crash-only: `exactlyd` exits non-zero and its supervisor starts it again; its
//! lease runs out and its attempts move to other nodes under higher fencing tokens). A task
//! that returns ends quietly: every one returns only when the node stops, leaves the cluster,
//! or has nothing left to do. The executor and the scheduler are actors with supervisors of
//! their own (`server.rs`): the executor stops the node the same way, the scheduler is
//! started again.

use std::future::Future;

use tokio::task::{JoinError, JoinHandle};

use crate::node::Node;

/// What the end of the task `name` means: `Some(why)` if the node must stop.
pub fn verdict(name: &str, ended: &Result<(), JoinError>, shutting_down: bool) -> Option<String> {
    match ended {
        Err(e) if e.is_panic() && !shutting_down => Some(format!(
            "the node's {name} task panicked; stopping rather than running without it"
        )),
        _ => None,
    }
}

/// Spawns `task` on the current runtime, supervised (see the module).
pub fn spawn<F>(node: &Node, name: &'static str, task: F) -> JoinHandle<()>
where
    F: Future<Output = ()> + Send + 'static,
{
    spawn_on(&tokio::runtime::Handle::current(), node, name, task)
}

/// Spawns `task` on `runtime`, supervised (see the module). Aborting the returned handle
/// aborts the task.
pub fn spawn_on<F>(
    runtime: &tokio::runtime::Handle,
    node: &Node,
    name: &'static str,
    task: F,
) -> JoinHandle<()>
where
    F: Future<Output = ()> + Send + 'static,
{
    let watched = node.clone();
    let stopping = node.clone();
    watch(
        name,
        runtime.spawn(task),
        move || stopping.shutdown.is_cancelled(),
        move |why| watched.fail(why),
    )
}

/// Watches `task`: if it panics while `shutting_down()` is false, calls `fail` with why.
/// Aborting the returned handle aborts the task.
fn watch<S, F>(
    name: &'static str,
    task: JoinHandle<()>,
    shutting_down: S,
    fail: F,
) -> JoinHandle<()>
where
    S: Fn() -> bool + Send + 'static,
    F: FnOnce(String) + Send + 'static,
{
    struct AbortOnDrop(tokio::task::AbortHandle);
    impl Drop for AbortOnDrop {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    // Made before the supervisor runs and moved into it, so that aborting the supervisor even
    // before its first poll drops it and aborts the task.
    let abort = AbortOnDrop(task.abort_handle());
    tokio::spawn(async move {
        let _abort = abort;
        let ended = task.await;
        if let Some(why) = verdict(name, &ended, shutting_down()) {
            fail(why);
        }
    })
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use super::*;

    /// A panic while the node runs stops it, naming the task; a task that returns, or panics
    /// while the node is stopping, does not; aborting the supervisor aborts the task.
    #[tokio::test]
    async fn a_panicking_task_stops_the_node_and_nothing_else_does() {
        let failed: Arc<Mutex<Vec<String>>> = Arc::default();
        let run = |name: &'static str, shutting_down: bool, task: JoinHandle<()>| {
            let failed = failed.clone();
            watch(
                name,
                task,
                move || shutting_down,
                move |why| failed.lock().unwrap().push(why),
            )
        };
        run("lease", false, tokio::spawn(async { panic!("boom") }))
            .await
            .unwrap();
        run("server", false, tokio::spawn(async {})).await.unwrap();
        run("proposer", true, tokio::spawn(async { panic!("boom") }))
            .await
            .unwrap();
        assert_eq!(
            *failed.lock().unwrap(),
            vec!["the node's lease task panicked; stopping rather than running without it"]
        );

        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let long = tokio::spawn(async move {
            let _tx = tx;
            tokio::time::sleep(Duration::from_secs(3600)).await;
        });
        let supervisor = run("reloader", false, long);
        supervisor.abort();
        // The task was dropped with the supervisor: its end of the channel closed.
        assert!(rx.await.is_err());
        assert_eq!(failed.lock().unwrap().len(), 1, "an abort is not a failure");
    }
}
