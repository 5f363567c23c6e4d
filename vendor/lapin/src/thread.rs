// PATCHED (Warren, issue #19): the I/O loop runs as a task on the connection's runtime
// instead of a thread of its own; its "join handle" is the channel its result arrives on.
use crate::Result;
use std::sync::{Arc, Mutex, MutexGuard};

pub(crate) struct JoinHandle(pub(crate) flume::Receiver<Result<()>>);
type Inner = Option<JoinHandle>;

#[derive(Clone)]
pub(crate) struct ThreadHandle(Arc<Mutex<Inner>>);

impl Default for ThreadHandle {
    fn default() -> Self {
        Self(Arc::new(Mutex::new(None)))
    }
}

impl ThreadHandle {
    pub(crate) fn register(&self, handle: JoinHandle) {
        *self.lock_inner() = Some(handle);
    }

    fn take(&self) -> Option<JoinHandle> {
        self.lock_inner().take()
    }

    /// Blocks the calling thread until the I/O loop ends (`Connection::run`); must not be
    /// called from a thread of the runtime the loop runs on.
    pub(crate) fn wait(&self, _context: &'static str) -> Result<()> {
        if let Some(handle) = self.take() {
            // A loop that ended without sending (its runtime shut down) ended all the same.
            return handle.0.recv().unwrap_or(Ok(()));
        }
        Ok(())
    }

    fn lock_inner(&self) -> MutexGuard<'_, Inner> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}
