use std::io::Result as IoResult;
use std::io::{BufRead, Read, Write}; // PATCH: BufRead, for the head reader

// PATCH: a one-value hand-off in place of std's mpsc channel (see `handoff` below)
use self::handoff::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};

use std::mem;

pub struct SequentialReaderBuilder<R>
where
    R: Read + Send,
{
    inner: SequentialReaderBuilderInner<R>,
}

enum SequentialReaderBuilderInner<R>
where
    R: Read + Send,
{
    First(R),
    NotFirst(Receiver<R>),
}

pub struct SequentialReader<R>
where
    R: Read + Send,
{
    inner: SequentialReaderInner<R>,
    next: Sender<R>,
}

enum SequentialReaderInner<R>
where
    R: Read + Send,
{
    MyTurn(R),
    Waiting(Receiver<R>),
    Empty,
}

pub struct SequentialWriterBuilder<W>
where
    W: Write + Send,
{
    writer: Arc<Mutex<W>>,
    next_trigger: Option<Receiver<()>>,
}

pub struct SequentialWriter<W>
where
    W: Write + Send,
{
    trigger: Option<Receiver<()>>,
    writer: Arc<Mutex<W>>,
    on_finish: Sender<()>,
}

impl<R: Read + Send> SequentialReaderBuilder<R> {
    pub fn new(reader: R) -> SequentialReaderBuilder<R> {
        SequentialReaderBuilder {
            inner: SequentialReaderBuilderInner::First(reader),
        }
    }
}

impl<W: Write + Send> SequentialWriterBuilder<W> {
    pub fn new(writer: W) -> SequentialWriterBuilder<W> {
        SequentialWriterBuilder {
            writer: Arc::new(Mutex::new(writer)),
            next_trigger: None,
        }
    }
}

impl<R: Read + Send> Iterator for SequentialReaderBuilder<R> {
    type Item = SequentialReader<R>;

    fn next(&mut self) -> Option<SequentialReader<R>> {
        let (tx, rx) = channel();

        let inner = mem::replace(&mut self.inner, SequentialReaderBuilderInner::NotFirst(rx));

        match inner {
            SequentialReaderBuilderInner::First(reader) => Some(SequentialReader {
                inner: SequentialReaderInner::MyTurn(reader),
                next: tx,
            }),

            SequentialReaderBuilderInner::NotFirst(previous) => Some(SequentialReader {
                inner: SequentialReaderInner::Waiting(previous),
                next: tx,
            }),
        }
    }
}

impl<W: Write + Send> Iterator for SequentialWriterBuilder<W> {
    type Item = SequentialWriter<W>;
    fn next(&mut self) -> Option<SequentialWriter<W>> {
        let (tx, rx) = channel();
        let mut next_next_trigger = Some(rx);
        ::std::mem::swap(&mut next_next_trigger, &mut self.next_trigger);

        Some(SequentialWriter {
            trigger: next_next_trigger,
            writer: self.writer.clone(),
            on_finish: tx,
        })
    }
}

impl<R: Read + Send> Read for SequentialReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> IoResult<usize> {
        let mut reader = match self.inner {
            SequentialReaderInner::MyTurn(ref mut reader) => return reader.read(buf),
            SequentialReaderInner::Waiting(ref mut recv) => recv.recv().unwrap(),
            SequentialReaderInner::Empty => unreachable!(),
        };

        let result = reader.read(buf);
        self.inner = SequentialReaderInner::MyTurn(reader);
        result
    }
}

/// PATCH (outline-mcp-proxy): the head of a request is read from the buffer a line at
/// a time (`ClientConnection::read_next_line`), not one byte per call.
impl<R: BufRead + Send> BufRead for SequentialReader<R> {
    fn fill_buf(&mut self) -> IoResult<&[u8]> {
        if let SequentialReaderInner::Waiting(ref mut recv) = self.inner {
            let reader = recv.recv().unwrap();
            self.inner = SequentialReaderInner::MyTurn(reader);
        }
        match self.inner {
            SequentialReaderInner::MyTurn(ref mut reader) => reader.fill_buf(),
            _ => unreachable!(),
        }
    }

    fn consume(&mut self, amount: usize) {
        if let SequentialReaderInner::MyTurn(ref mut reader) = self.inner {
            reader.consume(amount)
        }
    }
}

impl<W: Write + Send> Write for SequentialWriter<W> {
    fn write(&mut self, buf: &[u8]) -> IoResult<usize> {
        if let Some(v) = self.trigger.as_mut() {
            v.recv().unwrap()
        }
        self.trigger = None;

        self.writer.lock().unwrap().write(buf)
    }

    fn flush(&mut self) -> IoResult<()> {
        if let Some(v) = self.trigger.as_mut() {
            v.recv().unwrap()
        }
        self.trigger = None;

        self.writer.lock().unwrap().flush()
    }
}

impl<R> Drop for SequentialReader<R>
where
    R: Read + Send,
{
    fn drop(&mut self) {
        let inner = mem::replace(&mut self.inner, SequentialReaderInner::Empty);

        match inner {
            SequentialReaderInner::MyTurn(reader) => {
                self.next.send(reader).ok();
            }
            SequentialReaderInner::Waiting(recv) => {
                let reader = recv.recv().unwrap();
                self.next.send(reader).ok();
            }
            SequentialReaderInner::Empty => (),
        }
    }
}

impl<W> Drop for SequentialWriter<W>
where
    W: Write + Send,
{
    fn drop(&mut self) {
        self.on_finish.send(()).ok();
    }
}

/// PATCH (outline-mcp-proxy): the hand-off between one request's reader (or writer) and
/// the next's carries exactly one value. std's mpsc channel allocated and zeroed a block
/// of 31 slots for it, twice per request; this is one small allocation, and no system
/// call unless the receiver is already waiting. As with mpsc, `recv` fails once the
/// sender is gone without sending (the callers unwrap, as they did).
mod handoff {
    use std::sync::{Arc, Condvar, Mutex, MutexGuard};

    enum Slot<T> {
        Empty { waiting: bool },
        Full(T),
        Abandoned,
        Taken,
    }

    struct Shared<T> {
        slot: Mutex<Slot<T>>,
        ready: Condvar,
    }

    impl<T> Shared<T> {
        fn slot(&self) -> MutexGuard<'_, Slot<T>> {
            self.slot.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
        }

        /// Fills an empty slot (else leaves it), waking a receiver that waits.
        fn fill(&self, value: Slot<T>) {
            let mut slot = self.slot();
            if let Slot::Empty { waiting } = *slot {
                *slot = value;
                if waiting {
                    self.ready.notify_one();
                }
            }
        }
    }

    pub struct Sender<T>(Arc<Shared<T>>);
    pub struct Receiver<T>(Arc<Shared<T>>);

    #[derive(Debug)]
    pub struct RecvError;

    pub fn channel<T>() -> (Sender<T>, Receiver<T>) {
        let shared = Arc::new(Shared { slot: Mutex::new(Slot::Empty { waiting: false }), ready: Condvar::new() });
        (Sender(shared.clone()), Receiver(shared))
    }

    impl<T> Sender<T> {
        pub fn send(&self, value: T) -> Result<(), T> {
            self.0.fill(Slot::Full(value));
            Ok(())
        }
    }

    impl<T> Drop for Sender<T> {
        fn drop(&mut self) {
            self.0.fill(Slot::Abandoned);
        }
    }

    impl<T> Receiver<T> {
        pub fn recv(&self) -> Result<T, RecvError> {
            let mut slot = self.0.slot();
            loop {
                match std::mem::replace(&mut *slot, Slot::Taken) {
                    Slot::Full(value) => return Ok(value),
                    Slot::Empty { .. } => {
                        *slot = Slot::Empty { waiting: true };
                        slot = self.0.ready.wait(slot).unwrap_or_else(|poisoned| poisoned.into_inner());
                    }
                    Slot::Abandoned | Slot::Taken => return Err(RecvError),
                }
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::channel;

        #[test]
        fn one_value_across_threads() {
            let (tx, rx) = channel();
            let waiter = std::thread::spawn(move || rx.recv().ok());
            std::thread::sleep(std::time::Duration::from_millis(20));
            tx.send(7).ok();
            assert_eq!(waiter.join().unwrap(), Some(7));
        }

        #[test]
        fn sent_before_the_receiver_asks() {
            let (tx, rx) = channel();
            tx.send("x").ok();
            drop(tx);
            assert_eq!(rx.recv().ok(), Some("x"));
            assert!(rx.recv().is_err()); // one value only
        }

        #[test]
        fn a_sender_gone_without_sending_fails_the_receiver() {
            let (tx, rx) = channel::<u8>();
            let waiter = std::thread::spawn(move || rx.recv().is_err());
            std::thread::sleep(std::time::Duration::from_millis(20));
            drop(tx);
            assert!(waiter.join().unwrap());
        }
    }
}
