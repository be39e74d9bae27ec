//! Delivery of [`Event`]s to request handlers, off the engine loops' threads.
//!
//! A step's tokens go to up to `max_num_seqs` handlers, each behind its own channel, and a send that wakes
//! its handler costs the sender a cross-thread wake-up and cache misses on the channel. A loop therefore
//! collects a step's events in its [`Outbox`], by sequence id, and hands them over as one batch; the
//! [`Postman`]'s thread, which holds each sequence's channel from its [`Outbox::open`] to its
//! [`Outbox::close`], sends them on, in order. The loop's thread never touches a handler's channel per
//! token. A send that finds its handler gone (the client disconnected) is reported back to the sequence's
//! loop ([`Outbox::take_gone`]), which aborts it. One postman serves every loop of a process, and the failover path's own messages
//! ([`crate::engine::link::Migrant::fail`]) go through it too: a sequence's events arrive in the order
//! they were posted, even when it moves between replicas.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
};

use tokio::sync::mpsc::UnboundedSender;

use super::contract::Event;

enum Letter {
    /// Events for sequence `id` go to this channel from now on; if it is found closed, the id goes to the
    /// loop's [`Gone`].
    Open(u64, UnboundedSender<Event>, Arc<Gone>),
    Event(u64, Event),
    /// Sequence `id` is no longer this loop's (finished, aborted or handed over).
    Close(u64),
    /// One event to a channel directly.
    To(UnboundedSender<Event>, Event),
    /// The loop whose outbox has this [`Gone`] ended: its sequences still open are closed, so that their
    /// handlers, holding the last senders, see their channels end (a loop that panicked).
    CloseAll(Arc<Gone>),
}

/// Sends batches of events on from a thread of its own; cloned handles share it. The thread ends when the
/// last handle is dropped, after delivering what it was given.
#[derive(Clone)]
pub struct Postman {
    tx: mpsc::Sender<Vec<Letter>>,
}

impl Postman {
    pub fn start() -> Postman {
        let (tx, rx) = mpsc::channel::<Vec<Letter>>();
        std::thread::Builder::new()
            .name("tessera-postman".into())
            .spawn(move || {
                let mut open = Open::default();
                for batch in rx {
                    for letter in batch {
                        deliver(&mut open, letter);
                    }
                }
            })
            .expect("spawning the postman thread");
        Postman { tx }
    }

    /// Delivers `event` to `to` after everything posted before it.
    pub fn post(&self, to: &UnboundedSender<Event>, event: Event) {
        self.send(vec![Letter::To(to.clone(), event)]);
    }

    fn send(&self, batch: Vec<Letter>) {
        if let Err(mpsc::SendError(batch)) = self.tx.send(batch) {
            // The thread is gone (it panicked): deliver what can be delivered here rather than lose it.
            let mut open = Open::default();
            for letter in batch {
                deliver(&mut open, letter);
            }
        }
    }
}

/// Sequences whose handler was gone when the postman delivered to it, for their loop to abort.
#[derive(Default)]
struct Gone {
    ids: Mutex<Vec<u64>>,
    /// `ids` is not empty: lets the loop look without taking the lock.
    any: AtomicBool,
}

type Open = HashMap<u64, (UnboundedSender<Event>, Arc<Gone>), foldhash::fast::RandomState>;

fn deliver(open: &mut Open, letter: Letter) {
    match letter {
        Letter::Open(id, to, gone) => {
            open.insert(id, (to, gone));
        }
        Letter::Event(id, event) => {
            if let Some((to, gone)) = open.get(&id)
                && to.send(event).is_err()
            {
                // A handler that went away (its client disconnected) needs nothing more, and its loop can
                // stop computing for it.
                gone.ids.lock().unwrap_or_else(PoisonError::into_inner).push(id);
                gone.any.store(true, Ordering::Release);
                open.remove(&id);
            }
        }
        Letter::Close(id) => {
            open.remove(&id);
        }
        Letter::To(to, event) => {
            let _ = to.send(event);
        }
        Letter::CloseAll(of) => open.retain(|_, (_, gone)| !Arc::ptr_eq(gone, &of)),
    }
}

/// A loop's letters since its last [`Outbox::flush`], handed to the [`Postman`] together. Dropped (its
/// loop ended, or panicked), it sends what it holds and closes every sequence it left open.
pub struct Outbox {
    letters: Vec<Letter>,
    postman: Postman,
    gone: Arc<Gone>,
}

impl Outbox {
    pub fn new(postman: Postman) -> Outbox {
        Outbox { letters: Vec::new(), postman, gone: Arc::default() }
    }

    /// Sequence `id`'s events go to `to` until [`Outbox::close`].
    pub fn open(&mut self, id: u64, to: &UnboundedSender<Event>) {
        self.letters.push(Letter::Open(id, to.clone(), self.gone.clone()));
    }

    /// Sequences of this outbox whose handler the postman found gone since the last call.
    pub fn take_gone(&self) -> Vec<u64> {
        if !self.gone.any.swap(false, Ordering::Acquire) {
            return Vec::new();
        }
        std::mem::take(&mut *self.gone.ids.lock().unwrap_or_else(PoisonError::into_inner))
    }

    pub fn push(&mut self, id: u64, event: Event) {
        self.letters.push(Letter::Event(id, event));
    }

    /// Nothing more goes to sequence `id` from this loop: what was pushed before is still delivered.
    pub fn close(&mut self, id: u64) {
        self.letters.push(Letter::Close(id));
    }

    /// Sends what was pushed since the last flush.
    pub fn flush(&mut self) {
        if !self.letters.is_empty() {
            // The next step's batch is about as large: start it at this one's size.
            let next = Vec::with_capacity(self.letters.len());
            self.postman.send(std::mem::replace(&mut self.letters, next));
        }
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        self.letters.push(Letter::CloseAll(self.gone.clone()));
        self.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(t: u32) -> Event {
        Event::Token { choice: 0, token: t, logprob: None, top_logprobs: vec![] }
    }

    #[test]
    fn events_arrive_in_the_order_posted_and_only_while_their_sequence_is_open() {
        let postman = Postman::start();
        let (a, mut ra) = tokio::sync::mpsc::unbounded_channel();
        let (b, mut rb) = tokio::sync::mpsc::unbounded_channel();
        let mut outbox = Outbox::new(postman.clone());
        outbox.push(1, token(0)); // before it is open: nowhere to go
        outbox.open(1, &a);
        outbox.open(2, &b);
        outbox.push(1, token(1));
        outbox.push(2, token(10));
        outbox.push(1, token(2));
        outbox.close(1);
        outbox.push(1, token(3)); // after it closed
        // Nothing leaves before the flush.
        assert!(ra.try_recv().is_err());
        outbox.flush();
        // A message posted on its own after the batch arrives after it.
        postman.post(&a, Event::Error { choice: 0, message: "moved".into() });
        // Sequence 1 moves to another loop's outbox, on the same postman.
        let mut other = Outbox::new(postman.clone());
        other.open(1, &a);
        other.push(1, token(4));
        drop(other);
        outbox.push(2, token(11));
        drop(outbox);
        // Dropping the outbox closed sequence 2 (and only what it had open): the handler's own sender is
        // the last one.
        drop(b);
        assert_eq!(rb.blocking_recv(), Some(token(10)));
        assert_eq!(rb.blocking_recv(), Some(token(11)));
        assert_eq!(rb.blocking_recv(), None);
        // Its handler dropped: delivery to the others goes on.
        let (gone, dropped) = tokio::sync::mpsc::unbounded_channel();
        drop(dropped);
        postman.post(&gone, token(0));
        // Each channel ends once the postman thread has delivered everything and dropped its copies.
        drop((postman, a, gone));
        let got_a: Vec<Event> = std::iter::from_fn(|| ra.blocking_recv()).collect();
        assert_eq!(got_a, [token(1), token(2), Event::Error { choice: 0, message: "moved".into() }, token(4)]);
    }

    #[test]
    fn a_sequence_whose_handler_is_gone_is_reported_to_its_loop_once() {
        let postman = Postman::start();
        let (gone_tx, gone_rx) = tokio::sync::mpsc::unbounded_channel();
        let (here, mut here_rx) = tokio::sync::mpsc::unbounded_channel();
        let mut outbox = Outbox::new(postman.clone());
        let mut other = Outbox::new(postman);
        outbox.open(7, &gone_tx);
        other.open(8, &here);
        drop(gone_rx);
        outbox.push(7, token(1));
        outbox.push(7, token(2));
        outbox.flush();
        // Delivered after the batch above: once it arrives, the postman has tried sequence 7.
        other.push(8, token(3));
        other.flush();
        assert_eq!(here_rx.blocking_recv(), Some(token(3)));
        assert_eq!(outbox.take_gone(), [7], "reported once, to its own loop");
        assert!(outbox.take_gone().is_empty());
        assert!(other.take_gone().is_empty());
    }
}
