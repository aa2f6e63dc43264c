//! The rules of a daemon's download queue (docs/API.md, "Downloads"):
//! what each command does to a download's state, and which queued
//! downloads start when. Pure: the leaf's download manager holds the
//! downloads and runs what these rules return.

use serde::{Deserialize, Serialize};

/// Where a download stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Waiting for a free slot.
    Queued,
    /// Fetching.
    Running,
    /// Stopped by the user, its verified ranges kept.
    Paused,
    /// Complete and verified, at its path.
    Done,
    /// Stopped by an error (no source, every source failed, ...).
    Failed,
    /// Stopped by the user, its partial data deleted.
    Cancelled,
}

/// What the user asks of a download.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Pause,
    Resume,
    Cancel,
}

/// What carrying out a command takes, besides the new state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// Nothing: the state alone changes.
    None,
    /// Stop the running transfer, keeping what it verified.
    Stop,
    /// Stop it if it runs, and delete its partial data.
    StopAndDiscard,
}

/// Why a command was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("cannot {command} a download that is {state}")]
pub struct Refused {
    pub command: &'static str,
    pub state: &'static str,
}

impl State {
    pub fn name(self) -> &'static str {
        match self {
            State::Queued => "queued",
            State::Running => "running",
            State::Paused => "paused",
            State::Done => "done",
            State::Failed => "failed",
            State::Cancelled => "cancelled",
        }
    }

    /// Whether it holds partial data on disk that is still of use.
    pub fn is_unfinished(self) -> bool {
        !matches!(self, State::Done | State::Cancelled)
    }
}

impl Command {
    pub fn name(self) -> &'static str {
        match self {
            Command::Pause => "pause",
            Command::Resume => "resume",
            Command::Cancel => "cancel",
        }
    }
}

/// The state `command` takes a download in `state` to, and what must be
/// done for it. Pausing a paused download, or resuming a queued one, is
/// not an error: it is already so.
pub fn apply(state: State, command: Command) -> Result<(State, Effect), Refused> {
    use State::*;
    let refused = || Refused {
        command: command.name(),
        state: state.name(),
    };
    match (command, state) {
        (Command::Pause, Queued | Paused) => Ok((Paused, Effect::None)),
        (Command::Pause, Running) => Ok((Paused, Effect::Stop)),
        (Command::Resume, Paused | Failed | Cancelled | Queued) => Ok((Queued, Effect::None)),
        (Command::Resume, Running) => Ok((Running, Effect::None)),
        (Command::Cancel, Queued | Running | Paused | Failed) => {
            Ok((Cancelled, Effect::StopAndDiscard))
        }
        (Command::Cancel, Cancelled) => Ok((Cancelled, Effect::None)),
        (Command::Pause | Command::Cancel, Done | Failed | Cancelled) => Err(refused()),
        (Command::Resume, Done) => Err(refused()),
    }
}

/// What a download in `state` becomes when its daemon starts again: one
/// that was running or queued waits for a slot; the others stay.
pub fn on_restart(state: State) -> State {
    match state {
        State::Running => State::Queued,
        other => other,
    }
}

/// Which downloads to start now: the oldest queued ones (their order in
/// `states`, oldest first), as many as there are free slots among
/// `max_active`.
pub fn to_start(states: &[State], max_active: usize) -> Vec<usize> {
    let running = states.iter().filter(|s| **s == State::Running).count();
    let free = max_active.saturating_sub(running);
    states
        .iter()
        .enumerate()
        .filter(|(_, s)| **s == State::Queued)
        .map(|(i, _)| i)
        .take(free)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use State::*;

    #[test]
    fn the_oldest_queued_start_in_the_free_slots() {
        let states = [Done, Queued, Running, Queued, Paused, Queued];
        assert_eq!(to_start(&states, 3), vec![1, 3]);
        assert_eq!(to_start(&states, 1), Vec::<usize>::new());
        assert_eq!(to_start(&[Running, Running, Running, Queued], 3), vec![]);
    }

    #[test]
    fn commands_move_states_and_say_what_to_stop() {
        assert_eq!(apply(Running, Command::Pause), Ok((Paused, Effect::Stop)));
        assert_eq!(apply(Paused, Command::Resume), Ok((Queued, Effect::None)));
        assert_eq!(apply(Failed, Command::Resume), Ok((Queued, Effect::None)));
        assert_eq!(
            apply(Running, Command::Cancel),
            Ok((Cancelled, Effect::StopAndDiscard))
        );
        assert!(apply(Done, Command::Pause).is_err());
        assert!(apply(Done, Command::Cancel).is_err());
        assert!(apply(Done, Command::Resume).is_err());
        assert_eq!(
            apply(Done, Command::Cancel).unwrap_err().to_string(),
            "cannot cancel a download that is done"
        );
    }

    #[test]
    fn a_restart_queues_what_ran_and_keeps_what_the_user_stopped() {
        assert_eq!(on_restart(Running), Queued);
        assert_eq!(on_restart(Paused), Paused);
        assert_eq!(on_restart(Cancelled), Cancelled);
        assert_eq!(on_restart(Done), Done);
    }
}
