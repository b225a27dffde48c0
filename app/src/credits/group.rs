//! The browser side of a user's tab group (hydrate only): a Web Lock named for the user
//! elects the leader, a `BroadcastChannel` of the same name carries the [`Relay`]s. The
//! browser releases a lock when its tab closes, crashes or is discarded, so the next tab
//! waiting for it is granted it at once.

use std::{cell::Cell, future::Future, rc::Rc};

use futures::channel::mpsc::UnboundedSender;
use js_sys::{Function, Promise, Reflect};
use leptos::prelude::window;
use serde::Deserialize;
use wasm_bindgen::{JsCast, JsValue, closure::Closure};
use wasm_bindgen_futures::JsFuture;
use web_sys::{BroadcastChannel, MessageEvent};

use super::{Control, tabs::Relay};

/// This tab's membership of its user's group; leaving (dropping it) releases the lock.
pub struct Group {
    name: String,
    locks: JsValue,
    channel: BroadcastChannel,
    /// Keeps the channel's message handler alive while the group is.
    _on_message: Closure<dyn FnMut(MessageEvent)>,
    /// Resolving it releases the lock, once held.
    release: Rc<Cell<Option<Function>>>,
    left: Rc<Cell<bool>>,
}

impl Group {
    /// Joins `user`'s group: listens on its channel and queues for its lock, reporting
    /// [`Control::Relay`] and [`Control::Elected`]. `None` where the browser lacks Web Locks
    /// or `BroadcastChannel` (or the page is not a secure context), so the tab runs alone.
    pub fn join(user: &str, controls: UnboundedSender<Control>) -> Option<Self> {
        let locks = Reflect::get(&window().navigator(), &"locks".into()).ok()?;
        let request: Function = Reflect::get(&locks, &"request".into())
            .ok()?
            .dyn_into()
            .ok()?;
        let name = format!("livecredits:{user}");
        let channel = BroadcastChannel::new(&name).ok()?;

        let relays = controls.clone();
        let on_message = Closure::<dyn FnMut(MessageEvent)>::new(move |message: MessageEvent| {
            let relay = message
                .data()
                .as_string()
                .and_then(|text| serde_json::from_str::<Relay>(&text).ok());
            if let Some(relay) = relay {
                let _ = relays.unbounded_send(Control::Relay(relay));
            }
        });
        channel.set_onmessage(Some(on_message.as_ref().unchecked_ref()));

        let release = Rc::new(Cell::new(None));
        let left = Rc::new(Cell::new(false));
        let granted = {
            let (release, left) = (release.clone(), left.clone());
            // The lock is held until the promise this returns settles.
            Closure::once_into_js(move |_lock: JsValue| -> Promise {
                if left.get() {
                    return Promise::resolve(&JsValue::UNDEFINED);
                }
                let _ = controls.unbounded_send(Control::Elected);
                Promise::new(&mut |resolve, _reject| release.set(Some(resolve)))
            })
        };
        request
            .call2(&locks, &JsValue::from_str(&name), &granted)
            .ok()?;
        Some(Self {
            name,
            locks,
            channel,
            _on_message: on_message,
            release,
            left,
        })
    }

    /// Sends `relay` to the group's other tabs.
    pub fn post(&self, relay: &Relay) {
        if let Ok(text) = serde_json::to_string(relay) {
            let _ = self.channel.post_message(&JsValue::from_str(&text));
        }
    }

    /// The tabs in the group as the lock manager sees them: the holder and those queued.
    pub fn count(&self) -> impl Future<Output = Option<u32>> + 'static {
        #[derive(Deserialize)]
        struct Snapshot {
            held: Vec<Info>,
            pending: Vec<Info>,
        }
        #[derive(Deserialize)]
        struct Info {
            name: String,
        }
        let query = Reflect::get(&self.locks, &"query".into())
            .ok()
            .and_then(|query| query.dyn_into::<Function>().ok())
            .and_then(|query| query.call0(&self.locks).ok())
            .and_then(|promise| promise.dyn_into::<Promise>().ok());
        let name = self.name.clone();
        async move {
            let snapshot = JsFuture::from(query?).await.ok()?;
            let text = js_sys::JSON::stringify(&snapshot).ok()?.as_string()?;
            let snapshot: Snapshot = serde_json::from_str(&text).ok()?;
            let ours = snapshot
                .held
                .iter()
                .chain(&snapshot.pending)
                .filter(|lock| lock.name == name)
                .count();
            u32::try_from(ours).ok()
        }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        self.left.set(true);
        if let Some(release) = self.release.take() {
            let _ = release.call0(&JsValue::UNDEFINED);
        }
        self.channel.set_onmessage(None);
        self.channel.close();
    }
}
