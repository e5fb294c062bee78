// The web client's screens and state. User data only ever reaches the page
// as textContent or attribute values, never as HTML.

import * as api from "./api.js";
import { claimDevice } from "./devices.js";
import { Session } from "./socket.js";

const $ = (sel) => document.querySelector(sel);
const PAGE = 50;
const SEND_ATTEMPTS = 5;
const ACK_DELAY_MS = 300;

const STATE_TEXT = {
  connecting: "Connecting…",
  "catching-up": "Catching up…",
  live: "Live",
  offline: "Offline — reconnecting",
};

const app = {
  token: null,
  // an invite's code from the link, until joined or dismissed
  invite: null,
  me: null,
  device: null,
  session: null,
  // groupId -> {group, unread, last}
  groups: new Map(),
  open: null,
  // groupId -> Map(seq -> message)
  messages: new Map(),
  // groupId -> true once the oldest page was read
  complete: new Map(),
  // groupId -> Map(userId -> {d, r}): members' watermarks
  marks: new Map(),
  // groupId -> newest seq acknowledged by this tab
  acked: new Map(),
  // groups this page subscribed to
  subscribed: new Set(),
  // clientMsgId -> {groupId, data, attempts, el}
  pending: new Map(),
  // objectId -> {url, until}
  links: new Map(),
  ackTimer: null,
  // groupId -> Map(userId -> expiry timer): who is typing (a_typing)
  typing: new Map(),
  // groupId -> when this tab last told the group it is typing
  typedAt: new Map(),
  // userId -> online, for the members of the groups this page showed
  online: new Map(),
  // groupId -> its members' ids, from the last presence read
  members: new Map(),
  // the message the composer edits, {groupId, messageId}, or null
  editing: null,
  // the message the next one answers: {groupId, quote} (PROTOCOL.md, "Replies")
  replying: null,
  // groups with a mention of the user not yet seen (PROTOCOL.md, "Mentions")
  mentioned: new Set(),
  // groups deleted while this page was open: `deleted` is final, and an
  // event of the group that arrives after it brings nothing back
  deleted: new Set(),
  // the open group's pins as the server lists them (GET /groups/{id}/pins)
  pins: [],
  // the member button clicked once, waiting for the confirming click
  armed: null,
  // userIds this user blocks, newest first (GET /blocks)
  blocks: [],
  // the message whose Delete was clicked once (a second click deletes);
  // kept here, since every render makes the buttons anew
  deleting: null,
};

// ---------------------------------------------------------------- errors

function showError(code, message) {
  const box = $("#error");
  box.dataset.code = code;
  $("#error-text").textContent = `${code}: ${message}`;
  box.hidden = false;
}

function failed(e) {
  if (e instanceof api.ApiError) {
    if (e.code === "unauthorized") {
      signOut(`${e.code}: ${e.message}`);
      return;
    }
    showError(e.code, e.message);
  } else {
    showError("internal", String(e && e.message ? e.message : e));
  }
}

// ---------------------------------------------------------------- sign in

function claims(token) {
  try {
    const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const json = atob(part + "=".repeat((4 - (part.length % 4)) % 4));
    return JSON.parse(json);
  } catch {
    return null;
  }
}

// A token in the link (`#token=…`, the development stack's sign-in links),
// taken out of the address bar at once.
function linkedToken() {
  const hash = new URLSearchParams(location.hash.slice(1));
  const token = hash.get("token");
  if (token) history.replaceState(null, "", location.pathname + location.search);
  return token;
}

// An invite in the link (`#invite=…`): offered once signed in, never
// followed without a click (a link must not put anyone in a group).
function linkedInvite() {
  const hash = new URLSearchParams(location.hash.slice(1));
  const code = hash.get("invite");
  if (code && !hash.get("token")) history.replaceState(null, "", location.pathname + location.search);
  return code;
}

function offerInvite() {
  $("#join-offer").hidden = !(app.invite && app.me);
}

async function acceptInvite() {
  const code = app.invite;
  app.invite = null;
  offerInvite();
  if (!code) return;
  try {
    const g = await api.joinGroup(code);
    const known = app.groups.get(g.id);
    if (known) known.group = g;
    else app.groups.set(g.id, { group: g, unread: 0, last: null });
    renderGroups();
    await subscribe(g.id);
    openGroup(g.id);
  } catch (e) {
    failed(e);
  }
}

function savedToken() {
  return sessionStorage.getItem("chat.token") || localStorage.getItem("chat.token");
}

// Outside a development server a linked token is only offered: anyone can
// send a link with their own token in it, and signing the reader in as
// them (in place of the reader's own saved sign-in) would have the reader
// write into the sender's account. The reader's saved token wins; without
// one, the form is filled in and says whose token it is.
function offerLinkedToken(token) {
  const c = claims(token);
  if (!c || typeof c.sub !== "string") return;
  $("#token").value = token;
  const note = $("#linked-token");
  note.textContent = `A link offered a token for "${c.sub}". Sign in with it only if you trust whoever sent the link.`;
  note.hidden = false;
}

async function signIn(token) {
  const c = claims(token);
  if (!c || typeof c.sub !== "string") {
    showError("invalid", "that is not a JWT");
    return;
  }
  if (typeof c.exp === "number" && c.exp * 1000 <= Date.now()) {
    showError("unauthorized", "that token has expired");
    return;
  }
  api.setToken(token);
  let page;
  try {
    page = await api.listGroups();
  } catch (e) {
    api.setToken(null);
    if (e.code === "unauthorized") showError(e.code, "the server did not accept that token");
    else failed(e);
    return;
  }
  sessionStorage.setItem("chat.token", token);
  localStorage.setItem("chat.token", token);
  app.token = token;
  app.me = c.sub;
  app.device = claimDevice(c.sub);
  loadGroups(page);
  loadBlocks();
  $("#signin").hidden = true;
  $("#linked-token").hidden = true;
  $("#app").hidden = false;
  $("#whoami").textContent = c.name ? `${c.name} (${c.sub})` : c.sub;
  for (const id of ["#whoami", "#signout", "#conn-state"]) $(id).hidden = false;
  app.session = new Session({
    token,
    device: app.device.id,
    expiresAt: typeof c.exp === "number" ? c.exp * 1000 : 0,
    onState: showState,
    onOpen: caughtUp,
    onPush: push,
    onFatal: (code, message) =>
      code === "unauthorized" ? signOut(`${code}: ${message}`) : showError(code, message),
  });
  app.session.start();
  offerInvite();
}

function signOut(why) {
  if (app.session) app.session.stop();
  if (app.device) app.device.release();
  sessionStorage.removeItem("chat.token");
  localStorage.removeItem("chat.token");
  api.setToken(null);
  Object.assign(app, { token: null, me: null, device: null, session: null, open: null, blocks: [] });
  app.mentioned.clear();
  renderBlocks();
  for (const m of [app.groups, app.messages, app.complete, app.marks, app.acked, app.pending, app.subscribed]) {
    m.clear();
  }
  $("#app").hidden = true;
  offerInvite();
  for (const id of ["#whoami", "#signout", "#conn-state"]) $(id).hidden = true;
  $("#signin").hidden = false;
  document.body.classList.remove("chat-open");
  if (why) showError(why.split(":")[0], why.split(":").slice(1).join(":").trim());
}

function showState(s) {
  const el = $("#conn-state");
  el.dataset.state = s;
  el.textContent = STATE_TEXT[s] || s;
  if (s === "live") retryPending();
}

// ---------------------------------------------------------------- groups

function loadGroups(page) {
  for (const g of page.groups || []) {
    app.groups.set(g.id, {
      group: g,
      unread: g.unreadCount || 0,
      last: g.lastMessage || null,
      muted: !!g.muted,
    });
  }
  renderGroups();
}

function renderGroups() {
  const list = $("#groups");
  const entries = [...app.groups.values()].sort((a, b) =>
    (b.last?.createdAt || b.group.updatedAt).localeCompare(a.last?.createdAt || a.group.updatedAt),
  );
  list.replaceChildren(
    ...entries.map(({ group, unread, last }) => {
      const li = document.createElement("li");
      li.dataset.groupId = group.id;
      if (group.id === app.open) li.className = "open";
      const b = document.createElement("button");
      b.type = "button";
      const name = document.createElement("span");
      name.className = "name";
      name.textContent = group.name;
      if (app.mentioned.has(group.id)) {
        const at = document.createElement("span");
        at.className = "mentioned";
        at.textContent = "@";
        at.title = "You were mentioned";
        at.setAttribute("aria-label", "you were mentioned");
        name.append(" ", at);
      }
      const badge = document.createElement("span");
      badge.className = "unread";
      badge.dataset.count = String(unread);
      badge.textContent = String(unread);
      badge.setAttribute("aria-label", `${unread} unread`);
      const preview = document.createElement("span");
      preview.className = "preview";
      preview.textContent = last ? `${last.senderId}: ${summary(last)}` : "no messages yet";
      b.append(name, badge, preview);
      b.addEventListener("click", () => openGroup(group.id));
      li.append(b);
      return li;
    }),
  );
  $("#no-groups").hidden = entries.length > 0;
}

function summary(m) {
  return m.type === "text" ? m.text : `[${m.type}]`;
}

// Forgets a group the user is no longer in (or that was deleted).
function forgetGroup(groupId) {
  app.groups.delete(groupId);
  app.messages.delete(groupId);
  app.mentioned.delete(groupId);
  if (app.open === groupId) closeGroup();
  renderGroups();
}

function groupChanged(data) {
  const g = data.group;
  const change = data.change || {};
  if (change.kind === "deleted") app.deleted.add(g.id);
  if (app.deleted.has(g.id)) {
    forgetGroup(g.id);
    return;
  }
  const gone =
    (change.kind === "member_removed" || change.kind === "member_left") &&
    (change.userIds || []).includes(app.me);
  if (gone) {
    forgetGroup(g.id);
    return;
  }
  const known = app.groups.get(g.id);
  if (known) known.group = g;
  else {
    app.groups.set(g.id, { group: g, unread: 0, last: null });
    subscribe(g.id);
  }
  renderGroups();
  // the members as they now are, when the event lists them (up to 100):
  // who of them is online is known already or comes with `a_presence`,
  // so a change costs no request of every page that has the group open
  const listed = app.members.get(g.id);
  if (listed && g.members && g.members.length) {
    app.members.set(
      g.id,
      g.members.map((m) => m.userId),
    );
  } else if (listed) {
    // past 100 members the event leaves them out: its delta says who
    const who = change.userIds || [];
    if (change.kind === "members_added" || change.kind === "member_joined") {
      app.members.set(g.id, [...new Set([...listed, ...who])]);
    } else if (change.kind === "member_removed" || change.kind === "member_left") {
      app.members.set(
        g.id,
        listed.filter((u) => !who.includes(u)),
      );
    }
  }
  if (app.open === g.id) renderHeader();
  if (
    app.open === g.id &&
    (change.kind === "message_pinned" || change.kind === "message_unpinned")
  ) {
    loadPins(g.id);
  }
}

// ---------------------------------------------------------------- pins

// PROTOCOL.md, "Pins": the open group's pins, newest first; each shows its
// message's start when the page holds it.
let pinsAsked = 0;
async function loadPins(groupId) {
  // only the newest answer counts: two reads can end out of order
  const asked = ++pinsAsked;
  try {
    const list = await api.pins(groupId);
    if (app.open !== groupId || asked !== pinsAsked) return;
    app.pins = list.pins;
    renderPins();
    renderMessages();
  } catch (e) {
    failed(e);
  }
}

function renderPins() {
  // (not `held`, which would make an empty page of the group: opening it
  // would then read no history)
  const m = app.messages.get(app.open) || new Map();
  $("#pinned").hidden = app.pins.length === 0;
  $("#pin-list").replaceChildren(
    ...app.pins.map((p) => {
      const li = document.createElement("li");
      li.dataset.messageId = p.messageId;
      const msg = m.get(p.seq);
      const shown = msg ? (msg.deleted ? "[deleted]" : summary(msg)) : `message #${p.seq}`;
      li.textContent = `${shown} (pinned by ${p.pinnedBy})`;
      return li;
    }),
  );
}

function pinned(m) {
  return app.pins.some((p) => p.messageId === m.messageId);
}

async function togglePin(m) {
  try {
    if (pinned(m)) await api.unpin(m.groupId, m.messageId);
    else await api.pin(m.groupId, m.messageId);
  } catch (e) {
    failed(e);
  }
  loadPins(m.groupId);
}

// ---------------------------------------------------------------- invites

// The owner's invites to the open group: a new one's link (its code is
// given out once), and the valid ones, each with a way to revoke it.
async function loadInvites() {
  const groupId = app.open;
  const g = app.groups.get(groupId)?.group;
  if (!g || g.ownerId !== app.me) return;
  try {
    const list = await api.invites(groupId);
    if (app.open === groupId) renderInvites(list.invites);
  } catch (e) {
    failed(e);
  }
}

function renderInvites(invites) {
  $("#invite-list").replaceChildren(
    ...invites.map((i) => {
      const li = document.createElement("li");
      li.dataset.inviteId = i.inviteId;
      const text = document.createElement("span");
      const uses = i.maxUses ? `${i.uses} of ${i.maxUses} used` : `${i.uses} joined`;
      text.textContent = `Invite ${i.inviteId.slice(0, 6)}: ${uses}, until ${new Date(i.expiresAt).toLocaleString()}`;
      const revoke = document.createElement("button");
      revoke.type = "button";
      revoke.className = "revoke";
      revoke.textContent = "Revoke";
      revoke.addEventListener("click", () => revokeInvite(i.inviteId));
      li.append(text, " ", revoke);
      return li;
    }),
  );
}

async function createInvite() {
  const groupId = app.open;
  try {
    const i = await api.createInvite(groupId);
    if (app.open !== groupId) return;
    $("#invite-link").value = `${location.origin}${location.pathname}#invite=${encodeURIComponent(i.code)}`;
    $("#invite-link-row").hidden = false;
    $("#invite-link").select();
    loadInvites();
  } catch (e) {
    failed(e);
  }
}

async function revokeInvite(inviteId) {
  try {
    await api.revokeInvite(app.open, inviteId);
  } catch (e) {
    failed(e);
  }
  loadInvites();
}

function clearInvites() {
  $("#invite-link").value = "";
  $("#invite-link-row").hidden = true;
  $("#invite-list").replaceChildren();
}

// ---------------------------------------------------------------- search

// PROTOCOL.md, `GET /groups/{id}/search`: the open group's matches, newest
// first; each call reads a bounded number of messages, and "Search older
// messages" goes on from its `next`.
const search = { groupId: null, q: "", next: null, found: [], asked: 0 };

async function runSearch(ev, more = false) {
  if (ev) ev.preventDefault();
  const groupId = app.open;
  if (!groupId) return;
  if (!more) {
    const q = $("#search-input").value.trim();
    if (!q) return;
    Object.assign(search, { groupId, q, next: null, found: [] });
  }
  // only the newest answer counts
  const asked = ++search.asked;
  $("#search-status").textContent = "Searching…";
  $("#search-results").hidden = false;
  try {
    const page = await api.search(groupId, search.q, more ? search.next : undefined);
    if (asked !== search.asked || app.open !== groupId) return;
    search.found.push(...page.messages);
    search.next = page.next ?? null;
    renderSearch();
  } catch (e) {
    if (asked === search.asked) $("#search-status").textContent = "";
    failed(e);
  }
}

function renderSearch() {
  const n = search.found.length;
  const where = search.next
    ? `searched back to message #${search.next}`
    : "searched every message you can see";
  $("#search-status").textContent = `${n === 0 ? "No" : n} ${n === 1 ? "match" : "matches"} for “${search.q}”, ${where}`;
  $("#search-list").replaceChildren(
    ...search.found.map((m) => {
      const li = document.createElement("li");
      li.dataset.seq = String(m.seq);
      li.tabIndex = 0;
      li.textContent = `#${m.seq} ${m.senderId}: ${summary(m)}`;
      const show = () => showMessage(m.seq);
      li.addEventListener("click", show);
      li.addEventListener("keydown", (ev) => {
        if (ev.key === "Enter") show();
      });
      return li;
    }),
  );
  $("#search-more").hidden = !search.next;
}

function closeSearch() {
  search.asked++;
  Object.assign(search, { groupId: null, q: "", next: null, found: [] });
  $("#search-results").hidden = true;
  $("#search-list").replaceChildren();
  $("#search-input").value = "";
}

// Brings a message into the conversation (reading older pages until the
// page holds it, at most SHOW_PAGES of them) and scrolls to it.
const SHOW_PAGES = 40;
async function showMessage(seq) {
  const groupId = app.open;
  const asked = search.asked;
  for (let i = 0; i < SHOW_PAGES; i++) {
    if (app.open !== groupId || search.asked !== asked) return;
    if (held(groupId).has(seq) || app.complete.get(groupId)) break;
    const oldest = Math.min(...held(groupId).keys());
    await loadOlder();
    // nothing older came (an error): stop
    if (Math.min(...held(groupId).keys()) >= oldest) break;
  }
  const li = $(`#messages li[data-seq="${seq}"]`);
  if (!li) {
    $("#search-status").textContent = `Message #${seq} is too far back to show here`;
    return;
  }
  for (const f of document.querySelectorAll(".message.found")) f.classList.remove("found");
  li.classList.add("found");
  li.scrollIntoView({ block: "center" });
}

// Subscriptions are the server's (they outlast connections): once per
// group per page load is enough.
function subscribe(groupId) {
  if (app.subscribed.has(groupId)) return Promise.resolve();
  return app.session
    .request("subscribe_to_group", { groupId })
    .then(() => app.subscribed.add(groupId))
    .catch((e) => {
      if (e.code === "forbidden" || e.code === "not_found") app.groups.delete(groupId);
    });
}

async function createGroup(ev) {
  ev.preventDefault();
  const name = $("#group-name").value.trim();
  const members = $("#group-members")
    .value.split(/[\s,]+/)
    .map((m) => m.trim())
    .filter(Boolean);
  try {
    const g = await api.createGroup(name, members);
    app.groups.set(g.id, { group: g, unread: 0, last: null });
    renderGroups();
    $("#group-name").value = "";
    $("#group-members").value = "";
    await app.session.request("notify_create_group", { groupId: g.id }).catch(failed);
    await subscribe(g.id);
    openGroup(g.id);
  } catch (e) {
    failed(e);
  }
}

// ---------------------------------------------------------------- blocks

async function loadBlocks() {
  try {
    const list = await api.listBlocks();
    app.blocks = (list.blocks || []).map((b) => b.userId);
    renderBlocks();
  } catch (e) {
    failed(e);
  }
}

function renderBlocks() {
  $("#blocks").replaceChildren(
    ...app.blocks.map((userId) => {
      const li = document.createElement("li");
      li.dataset.userId = userId;
      const name = document.createElement("span");
      name.textContent = userId;
      const b = document.createElement("button");
      b.type = "button";
      b.textContent = "Unblock";
      b.setAttribute("aria-label", `Unblock ${userId}`);
      b.addEventListener("click", async () => {
        try {
          await api.unblock(userId);
          app.blocks = app.blocks.filter((u) => u !== userId);
          renderBlocks();
        } catch (e) {
          failed(e);
        }
      });
      li.append(name, b);
      return li;
    }),
  );
}

async function blockUser(ev) {
  ev.preventDefault();
  const userId = $("#block-user").value.trim();
  try {
    await api.block(userId);
    app.blocks = [userId, ...app.blocks.filter((u) => u !== userId)];
    renderBlocks();
    $("#block-user").value = "";
  } catch (e) {
    failed(e);
  }
}

// ---------------------------------------------------------------- messages

function held(groupId) {
  let m = app.messages.get(groupId);
  if (!m) {
    m = new Map();
    app.messages.set(groupId, m);
  }
  return m;
}

function newestSeq(groupId) {
  const m = app.messages.get(groupId);
  return m && m.size ? Math.max(...m.keys()) : 0;
}

// Adds messages (deduplicated by seq) and redraws the open group.
function merge(groupId, list) {
  const m = held(groupId);
  for (const msg of list) m.set(msg.seq, msg);
  if (groupId === app.open) renderMessages();
}

async function openGroup(groupId) {
  if (!app.groups.has(groupId)) return;
  if (app.editing) stopEditing();
  if (app.replying) stopReplying();
  app.mentioned.delete(groupId);
  app.armed = null;
  // what was typed into one group's settings never applies to another
  $("#group-tools").open = false;
  $("#rename-name").value = "";
  $("#add-member").value = "";
  app.open = groupId;
  app.pins = [];
  renderPins();
  closeSearch();
  clearInvites();
  document.body.classList.add("chat-open");
  $("#no-chat").hidden = true;
  $("#chat-body").hidden = false;
  renderHeader();
  renderGroups();
  $("#messages").replaceChildren();
  if (!app.messages.has(groupId)) {
    try {
      const page = await api.history(groupId, 0, PAGE);
      if (page.messages.length < PAGE) app.complete.set(groupId, true);
      merge(groupId, page.messages);
    } catch (e) {
      failed(e);
    }
  }
  renderMessages(true);
  renderTyping();
  loadPins(groupId);
  loadPresence(groupId);
  seedReceipts(groupId);
  markRead();
  $("#message-input").focus();
}

function closeGroup() {
  app.open = null;
  document.body.classList.remove("chat-open");
  $("#chat-body").hidden = true;
  $("#no-chat").hidden = false;
  renderGroups();
}

function renderHeader() {
  const { group, muted } = app.groups.get(app.open) || {};
  if (!group) return;
  $("#chat-title").textContent = group.name;
  const online = (app.members.get(app.open) || []).filter((u) => app.online.get(u)).length;
  $("#chat-members").textContent = `${group.memberCount} members, ${online} online`;
  // what the caller may do: the owner manages the group, others may leave
  const owner = group.ownerId === app.me;
  for (const el of document.querySelectorAll("#group-tools .owner-only")) el.hidden = !owner;
  $("#leave-group").hidden = owner;
  // a second click confirms, as for the members' buttons
  $("#delete-group").textContent =
    app.armed === "delete-group" ? "Delete the group for everyone?" : "Delete the group";
  renderMemberList(group, owner);
  const toggle = $("#mute-toggle");
  toggle.setAttribute("aria-pressed", String(!!muted));
  toggle.textContent = muted ? "Unmute notifications" : "Mute notifications";
}

// ---------------------------------------------------------------- group settings

// The members (as the group's last event or listing gave them: up to 100
// in an event), and for the owner a way to remove each or hand it the group.
function renderMemberList(group, owner) {
  const ids = (group.members || []).map((m) => m.userId);
  $("#member-list").replaceChildren(
    ...ids.map((userId) => {
      const li = document.createElement("li");
      li.dataset.userId = userId;
      const name = document.createElement("span");
      name.textContent = userId === group.ownerId ? `${userId} (owner)` : userId;
      li.append(name);
      if (owner && userId !== app.me) {
        li.append(
          memberButton(`make-owner:${userId}`, "Make owner", () =>
            api.transferOwner(group.id, userId),
          ),
          memberButton(`remove:${userId}`, "Remove", () => api.removeMember(group.id, userId)),
        );
      }
      return li;
    }),
  );
}

// `key` (`<kind>:<user>`) names the button across renders (the header is
// drawn again at every presence change): a second click confirms, as for
// deleting a message, and no modal dialog is needed.
function memberButton(key, label, call) {
  const b = document.createElement("button");
  b.type = "button";
  b.className = key.split(":")[0];
  const armed = app.armed === key;
  b.textContent = armed ? `${label}?` : label;
  b.addEventListener("click", async () => {
    if (app.armed !== key) {
      app.armed = key;
      renderHeader();
      return;
    }
    app.armed = null;
    b.disabled = true;
    try {
      answered(await call());
    } catch (e) {
      b.disabled = false;
      failed(e);
    }
  });
  return b;
}

// The group as an owner's change answered it (its event follows, and
// says the same).
function answered(g) {
  const known = app.groups.get(g.id);
  if (known) known.group = g;
  renderGroups();
  if (app.open === g.id) renderHeader();
}

async function renameGroup(ev) {
  ev.preventDefault();
  const groupId = app.open;
  const name = $("#rename-name").value.trim();
  try {
    answered(await api.updateGroup(groupId, { name }));
    $("#rename-name").value = "";
  } catch (e) {
    failed(e);
  }
}

async function addMember(ev) {
  ev.preventDefault();
  const groupId = app.open;
  const userIds = $("#add-member")
    .value.split(/[\s,]+/)
    .map((m) => m.trim())
    .filter(Boolean);
  try {
    answered(await api.addMembers(groupId, userIds));
    $("#add-member").value = "";
  } catch (e) {
    failed(e);
  }
}

// Push notifications of the group's messages (not what this page shows).
async function toggleMute() {
  const groupId = app.open;
  const entry = app.groups.get(groupId);
  const toggle = $("#mute-toggle");
  if (!entry || toggle.disabled) return;
  toggle.disabled = true;
  try {
    // the state the server answers, not a flip of what the page thought
    if (entry.muted) {
      await api.unmute(groupId);
      entry.muted = false;
    } else {
      entry.muted = (await api.mute(groupId)).muted;
    }
  } catch (e) {
    failed(e);
  } finally {
    toggle.disabled = false;
    if (app.open === groupId) renderHeader();
  }
}

// The owner deletes the group for everyone: a first click asks, a second
// deletes. Every member's page, this one included, hears `deleted` too.
async function deleteGroup() {
  const groupId = app.open;
  if (app.armed !== "delete-group") {
    app.armed = "delete-group";
    renderHeader();
    return;
  }
  app.armed = null;
  const b = $("#delete-group");
  b.disabled = true;
  try {
    await api.deleteGroup(groupId);
    app.deleted.add(groupId);
    forgetGroup(groupId);
  } catch (e) {
    failed(e);
  } finally {
    b.disabled = false;
    renderHeader();
  }
}

// The server tells every member, this page included, with `member_left`
// naming the caller: `groupChanged` closes the group then.
async function leaveGroup() {
  try {
    await api.leaveGroup(app.open);
  } catch (e) {
    failed(e);
  }
}

// PROTOCOL.md, "Presence": the members' presence when a group opens, then
// `a_presence` keeps it current.
async function loadPresence(groupId) {
  try {
    const p = await api.groupPresence(groupId);
    app.members.set(groupId, p.members.map((m) => m.userId));
    for (const m of p.members) app.online.set(m.userId, m.online);
    if (groupId === app.open) renderHeader();
  } catch (e) {
    failed(e);
  }
}

async function loadOlder() {
  const groupId = app.open;
  if (!groupId || app.complete.get(groupId)) return;
  const m = held(groupId);
  const oldest = m.size ? Math.min(...m.keys()) : 0;
  if (oldest === 1) {
    app.complete.set(groupId, true);
    renderMessages();
    return;
  }
  const list = $("#messages");
  const fromBottom = list.scrollHeight - list.scrollTop;
  try {
    const page = await api.history(groupId, oldest || undefined, PAGE);
    if (page.messages.length < PAGE) app.complete.set(groupId, true);
    merge(groupId, page.messages);
    list.scrollTop = list.scrollHeight - fromBottom;
  } catch (e) {
    failed(e);
  }
}

function renderMessages(toBottom = false) {
  const groupId = app.open;
  if (!groupId) return;
  const list = $("#messages");
  const atBottom = toBottom || list.scrollHeight - list.scrollTop - list.clientHeight < 40;
  const msgs = [...held(groupId).values()].sort((a, b) => a.seq - b.seq);
  const pending = [...app.pending.values()].filter((p) => p.groupId === groupId);
  list.replaceChildren(...msgs.map(messageItem), ...pending.map((p) => p.el));
  $("#load-older").hidden = !!app.complete.get(groupId) || (msgs.length > 0 && msgs[0].seq === 1);
  if (atBottom) list.scrollTop = list.scrollHeight;
}

function messageItem(m) {
  const li = document.createElement("li");
  li.className = "message" + (m.senderId === app.me ? " mine" : "");
  li.dataset.seq = String(m.seq);
  li.dataset.messageId = m.messageId;
  li.dataset.sender = m.senderId;
  const meta = document.createElement("div");
  meta.className = "meta";
  const sender = document.createElement("span");
  sender.className = "sender";
  sender.textContent = m.senderId;
  const time = document.createElement("time");
  time.className = "time";
  time.dateTime = m.createdAt;
  time.textContent = new Date(m.createdAt).toLocaleTimeString();
  meta.append(sender, time);
  if (m.editedAt && !m.deleted) {
    const edited = document.createElement("span");
    edited.className = "edited";
    edited.title = new Date(m.editedAt).toLocaleString();
    edited.textContent = "(edited)";
    meta.append(edited);
  }
  li.append(meta);
  if (m.deleted) {
    // PROTOCOL.md, "Edits and deletes": a tombstone keeps its place
    li.classList.add("deleted");
    const t = document.createElement("div");
    t.className = "text tombstone";
    t.textContent = "This message was deleted";
    li.append(t);
    return li;
  }
  if (m.replyTo) {
    // PROTOCOL.md, "Replies": who wrote the answered message, and its start
    const quote = document.createElement("blockquote");
    quote.className = "reply-to";
    const shown = m.replyTo.deleted ? "[deleted]" : m.replyTo.preview || `[${m.replyTo.type}]`;
    quote.textContent = `${m.replyTo.senderId}: ${shown}`;
    li.append(quote);
  }
  li.append(body(m));
  if (mentionsMe(m)) li.classList.add("mentions-me");
  if (m.reactions && m.reactions.length) {
    // PROTOCOL.md, "Reactions": each emoji with its count
    const r = document.createElement("div");
    r.className = "reactions";
    r.textContent = m.reactions.map((x) => `${x.emoji} ${x.count}`).join("  ");
    li.append(r);
  }
  if (m.senderId === app.me) li.append(receipt(m));
  li.append(actions(m));
  return li;
}

// Edit (own text messages) and delete (own messages, or any as the owner).
function actions(m) {
  const box = document.createElement("div");
  box.className = "actions";
  const { group } = app.groups.get(m.groupId) || {};
  // a few quick reactions, each a toggle of the caller's own
  for (const emoji of QUICK_REACTIONS) {
    const mine = (m.reactions || []).some((x) => x.emoji === emoji && x.reacted);
    const b = document.createElement("button");
    b.type = "button";
    b.className = "react";
    b.dataset.emoji = emoji;
    b.textContent = emoji;
    b.setAttribute("aria-pressed", String(mine));
    b.setAttribute("aria-label", `${mine ? "Take back" : "React with"} ${emoji}`);
    b.addEventListener("click", () => react(m, emoji, !mine));
    box.append(b);
  }
  const reply = document.createElement("button");
  reply.type = "button";
  reply.className = "reply";
  reply.textContent = "Reply";
  reply.addEventListener("click", () => startReplying(m));
  box.append(reply);
  // anyone pins; the member who pinned it or the owner unpins
  const pinnedBy = app.pins.find((p) => p.messageId === m.messageId)?.pinnedBy;
  if (!pinnedBy || pinnedBy === app.me || (group && group.ownerId === app.me)) {
    const pin = document.createElement("button");
    pin.type = "button";
    pin.className = "pin";
    pin.textContent = pinnedBy ? "Unpin" : "Pin";
    pin.addEventListener("click", () => togglePin(m));
    box.append(pin);
  }
  if (m.senderId === app.me && m.type === "text") {
    const b = document.createElement("button");
    b.type = "button";
    b.className = "edit";
    b.textContent = "Edit";
    b.addEventListener("click", () => startEditing(m));
    box.append(b);
  }
  if (m.senderId === app.me || (group && group.ownerId === app.me)) {
    const b = document.createElement("button");
    b.type = "button";
    b.className = "delete";
    const armed = app.deleting === m.messageId;
    b.textContent = armed ? "Delete for everyone?" : "Delete";
    // a second click confirms: no modal dialog
    b.addEventListener("click", () => {
      if (app.deleting !== m.messageId) {
        app.deleting = m.messageId;
        renderMessages();
        return;
      }
      app.deleting = null;
      b.disabled = true;
      app.session
        .request("delete_group_message", { groupId: m.groupId, messageId: m.messageId })
        .then(() => messageDeleted({ groupId: m.groupId, seq: m.seq, messageId: m.messageId }))
        .catch(failed);
    });
    box.append(b);
  }
  return box;
}

const QUICK_REACTIONS = ["👍", "❤️", "😂"];

// Whether a text names the user as `@id` (ids are letters, digits, `-`
// and `_`, as the server reads mentions).
// Another member's, as the server reads mentions (never the sender's own).
let mentionOf = { me: null, re: null };
function mentionsMe(m) {
  if (m.type !== "text" || !m.text || !app.me || m.senderId === app.me) return false;
  if (mentionOf.me !== app.me) {
    const id = app.me.replace(/[^A-Za-z0-9_-]/g, "\\$&");
    mentionOf = { me: app.me, re: new RegExp(`(^|[^A-Za-z0-9_-])@${id}(?![A-Za-z0-9_-])`) };
  }
  return mentionOf.re.test(m.text);
}

// PROTOCOL.md, "Reactions": the ack carries the emoji's count and whether
// the caller reacted; others hear of it through `a_reaction`.
function react(m, emoji, add) {
  app.session
    .request(add ? "add_reaction" : "remove_reaction", {
      groupId: m.groupId,
      messageId: m.messageId,
      emoji,
    })
    .then((ack) => {
      const held = app.messages.get(m.groupId);
      const now = held && held.get(m.seq);
      if (!now) return;
      const others = (now.reactions || []).filter((x) => x.emoji !== emoji);
      now.reactions =
        ack.count > 0 ? [...others, { emoji, count: ack.count, reacted: ack.reacted }] : others;
      if (m.groupId === app.open) renderMessages();
    })
    .catch(failed);
}

// A reply shows what it answers as the server will: its sender and start.
function startReplying(m) {
  if (app.editing) stopEditing();
  const text = m.text || "";
  const preview = m.type === "text" ? ([...text].length > 100 ? `${[...text].slice(0, 100).join("")}…` : text) : undefined;
  app.replying = {
    groupId: m.groupId,
    quote: { messageId: m.messageId, seq: m.seq, senderId: m.senderId, type: m.type, preview },
  };
  $("#replying-text").textContent = `Replying to ${m.senderId}: ${preview ?? `[${m.type}]`}`;
  $("#replying").hidden = false;
  $("#message-input").focus();
}

function stopReplying() {
  app.replying = null;
  $("#replying").hidden = true;
}

function startEditing(m) {
  app.editing = { groupId: m.groupId, messageId: m.messageId, seq: m.seq };
  const input = $("#message-input");
  input.value = m.text || "";
  $("#editing").hidden = false;
  $("#send").textContent = "Save";
  input.focus();
}

function stopEditing() {
  app.editing = null;
  $("#editing").hidden = true;
  $("#send").textContent = "Send";
}

function messageUpdated(data) {
  const m = held(data.groupId).get(data.seq);
  if (m && !m.deleted) {
    m.text = data.text;
    m.editedAt = data.editedAt;
  }
  for (const other of held(data.groupId).values()) {
    if (other.replyTo && other.replyTo.messageId === data.messageId && other.replyTo.preview) {
      other.replyTo.preview = data.text.length > 100 ? `${[...data.text].slice(0, 100).join("")}…` : data.text;
    }
  }
  if (data.groupId === app.open) renderMessages();
}

function messageDeleted(data) {
  const m = held(data.groupId).get(data.seq);
  if (m) {
    m.deleted = true;
    delete m.text;
    delete m.media;
    delete m.replyTo;
    delete m.reactions;
  }
  for (const other of held(data.groupId).values()) {
    if (other.replyTo && other.replyTo.messageId === data.messageId) {
      other.replyTo.deleted = true;
      delete other.replyTo.preview;
    }
  }
  if (app.editing && app.editing.messageId === data.messageId) stopEditing();
  if (data.groupId === app.open) renderMessages();
}

function body(m) {
  if (m.type === "text" || !m.media) {
    const t = document.createElement("div");
    t.className = "text";
    t.textContent = m.text || "";
    return t;
  }
  const box = document.createElement("div");
  box.className = "media";
  const el = document.createElement(
    m.type === "image" ? "img" : m.type === "video" ? "video" : "audio",
  );
  if (m.type === "image") el.alt = `image from ${m.senderId}`;
  else el.controls = true;
  box.append(el);
  const object = m.media.key.split("/").pop();
  mediaLink(m.groupId, object)
    .then((url) => {
      el.src = url;
    })
    .catch(failed);
  return box;
}

async function mediaLink(groupId, object) {
  const hit = app.links.get(object);
  if (hit && hit.until > Date.now()) return hit.url;
  const link = await api.mediaUrl(groupId, object);
  // reuse until shortly before it expires
  const until = Date.parse(link.expiresAt) - 30000;
  app.links.set(object, { url: link.url, until });
  return link.url;
}

// ---------------------------------------------------------------- receipts

function marksOf(groupId) {
  let m = app.marks.get(groupId);
  if (!m) {
    m = new Map();
    app.marks.set(groupId, m);
  }
  return m;
}

function raiseMark(groupId, userId, d, r) {
  const m = marksOf(groupId);
  const was = m.get(userId) || { d: 0, r: 0 };
  m.set(userId, { d: Math.max(was.d, d, r), r: Math.max(was.r, r) });
}

function receipt(m) {
  const span = document.createElement("span");
  span.className = "receipt";
  const { group } = app.groups.get(m.groupId) || {};
  const total = Math.max(0, (group ? group.memberCount : 1) - 1);
  let delivered = 0;
  let read = 0;
  for (const [user, w] of marksOf(m.groupId)) {
    if (user === app.me) continue;
    if (w.d >= m.seq) delivered += 1;
    if (w.r >= m.seq) read += 1;
  }
  span.dataset.delivered = String(delivered);
  span.dataset.read = String(read);
  span.dataset.total = String(total);
  span.textContent = `Delivered ${delivered}/${total} · Read ${read}/${total}`;
  return span;
}

async function seedReceipts(groupId) {
  const mine = [...held(groupId).values()].filter((m) => m.senderId === app.me);
  if (!mine.length) return;
  const newest = mine.reduce((a, b) => (a.seq > b.seq ? a : b));
  try {
    const st = await api.messageStatus(groupId, newest.messageId);
    for (const mem of st.members || []) {
      raiseMark(groupId, mem.userId, mem.delivered ? st.seq : 0, mem.read ? st.seq : 0);
    }
    if (groupId === app.open) renderMessages();
  } catch (e) {
    if (e.code !== "not_found") failed(e);
  }
}

// Tells the server this tab showed the open group's newest message.
function markRead() {
  clearTimeout(app.ackTimer);
  app.ackTimer = setTimeout(() => {
    const groupId = app.open;
    if (!groupId || document.visibilityState !== "visible" || !app.session) return;
    const entry = app.groups.get(groupId);
    if (entry && entry.unread) {
      entry.unread = 0;
      renderGroups();
    }
    // the newest message of someone else (the server counts our own as read)
    const theirs = [...held(groupId).values()].filter((m) => m.senderId !== app.me);
    if (!theirs.length) return;
    const newest = theirs.reduce((a, b) => (a.seq > b.seq ? a : b));
    if ((app.acked.get(groupId) || 0) >= newest.seq) return;
    app.acked.set(groupId, newest.seq);
    app.session
      .request("acknowledge_group_message", { groupId, messageId: newest.messageId })
      .catch((e) => {
        app.acked.delete(groupId);
        if (e.code !== "unavailable") failed(e);
      });
  }, ACK_DELAY_MS);
}

// ---------------------------------------------------------------- sending

// A UUID v7 (32 hex digits): it says when it was minted, so the server
// keeps its send log entry for minutes rather than a day (PROTOCOL.md).
function clientMsgId() {
  const b = crypto.getRandomValues(new Uint8Array(16));
  let ms = Date.now();
  for (let i = 5; i >= 0; i--) {
    b[i] = ms % 256;
    ms = Math.floor(ms / 256);
  }
  b[6] = (b[6] & 0x0f) | 0x70;
  b[8] = (b[8] & 0x3f) | 0x80;
  return Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
}

function pendingItem(text) {
  const li = document.createElement("li");
  li.className = "message mine pending";
  const t = document.createElement("div");
  t.className = "text";
  t.textContent = text;
  li.append(t);
  return li;
}

function send(groupId, data, label, quote) {
  const id = clientMsgId();
  const p = {
    groupId,
    data: { ...data, groupId, clientMsgId: id },
    quote,
    attempts: 0,
    el: pendingItem(label),
  };
  app.pending.set(id, p);
  renderMessages(true);
  attempt(id);
}

function attempt(id) {
  const p = app.pending.get(id);
  if (!p || p.inFlight) return;
  p.attempts += 1;
  p.inFlight = true;
  app.session
    .request("send_group_message", p.data)
    .then((ack) => {
      app.pending.delete(id);
      const msg = {
        messageId: ack.messageId,
        groupId: ack.groupId,
        seq: ack.seq,
        senderId: app.me,
        type: p.data.type,
        text: p.data.text,
        media: p.data.media,
        replyTo: p.quote,
        createdAt: ack.createdAt,
      };
      // the live copy may have come first: same seq, same message
      if (!held(p.groupId).has(ack.seq)) merge(p.groupId, [msg]);
      else renderMessages();
      noteLast(p.groupId, msg);
    })
    .catch((e) => {
      p.inFlight = false;
      if (e.code === "unavailable" && p.attempts < SEND_ATTEMPTS) return; // again when live
      app.pending.delete(id);
      p.el.classList.remove("pending");
      p.el.classList.add("failed");
      failed(e);
      renderMessages();
    });
}

function retryPending() {
  for (const id of app.pending.keys()) attempt(id);
}

function noteLast(groupId, msg) {
  const entry = app.groups.get(groupId);
  if (entry && (!entry.last || entry.last.seq <= msg.seq)) {
    entry.last = msg;
    renderGroups();
  }
}

function sendText(ev) {
  ev.preventDefault();
  const input = $("#message-input");
  const text = input.value;
  if (!app.open || !text.trim()) return;
  input.value = "";
  stopTyping(app.open);
  const editing = app.editing;
  if (editing) {
    stopEditing();
    app.session
      .request("edit_group_message", { groupId: editing.groupId, messageId: editing.messageId, text })
      .then((ack) => messageUpdated({ ...editing, text, editedAt: ack.editedAt }))
      .catch(failed);
    return;
  }
  const replying = app.replying && app.replying.groupId === app.open ? app.replying : null;
  if (replying) {
    stopReplying();
    send(app.open, { type: "text", text, replyTo: replying.quote.messageId }, text, replying.quote);
    return;
  }
  send(app.open, { type: "text", text }, text);
}

// ---------------------------------------------------------------- typing

// PROTOCOL.md, "Typing": a start holds for 6 s at the others, so it is
// sent again every 3 s while the user types; the edge passes on at most
// one per 2 s anyway.
const TYPING_RENEW_MS = 3000;

function typed() {
  const groupId = app.open;
  if (!groupId || !app.session || !$("#message-input").value.trim()) return;
  const at = app.typedAt.get(groupId) || 0;
  if (Date.now() - at < TYPING_RENEW_MS) return;
  app.typedAt.set(groupId, Date.now());
  app.session.request("typing", { groupId, state: "start" }).catch(() => {});
}

function stopTyping(groupId) {
  if (!groupId || !app.typedAt.has(groupId)) return;
  app.typedAt.delete(groupId);
  if (app.session) app.session.request("typing", { groupId, state: "stop" }).catch(() => {});
}

function heardTyping(data) {
  const who = app.typing.get(data.groupId) || new Map();
  app.typing.set(data.groupId, who);
  clearTimeout(who.get(data.userId));
  if (data.state === "start") {
    const expire = () => {
      who.delete(data.userId);
      renderTyping();
    };
    who.set(data.userId, setTimeout(expire, data.expiresInMs || 6000));
  } else {
    who.delete(data.userId);
  }
  renderTyping();
}

function renderTyping() {
  const who = [...(app.typing.get(app.open) || new Map()).keys()].sort();
  const line = $("#typing");
  line.textContent =
    who.length === 0 ? "" : who.length === 1 ? `${who[0]} is typing…` : `${who.join(", ")} are typing…`;
}

async function sendFile() {
  const input = $("#file-input");
  const file = input.files && input.files[0];
  input.value = "";
  const groupId = app.open;
  if (!file || !groupId) return;
  const type = (file.type || "").split("/")[0];
  if (!["image", "video", "audio"].includes(type)) {
    showError("invalid", `${file.name} is not an image, video or audio file`);
    return;
  }
  const bar = $("#upload-progress");
  bar.value = 0;
  bar.hidden = false;
  try {
    const ticket = await api.createUpload(groupId, { type, mime: file.type, size: file.size });
    await api.putFile(ticket, file, (f) => {
      bar.value = f;
    });
    send(groupId, { type, media: { key: ticket.key, mime: file.type, size: file.size } }, `[${type}]`);
  } catch (e) {
    failed(e);
  } finally {
    bar.hidden = true;
  }
}

// ---------------------------------------------------------------- pushes

function push(event, data) {
  switch (event) {
    case "a_group_message": {
      const known = app.groups.get(data.groupId);
      if (!known) return;
      // newer than what the list knows: a catch-up after a reconnect
      // replays messages the list's unread count already holds
      const newer = !known.last || data.seq > known.last.seq;
      merge(data.groupId, [data]);
      noteLast(data.groupId, data);
      // a member who sent has stopped typing
      const typing = app.typing.get(data.groupId);
      if (typing && typing.has(data.senderId)) {
        clearTimeout(typing.get(data.senderId));
        typing.delete(data.senderId);
        renderTyping();
      }
      if (data.senderId !== app.me && newer) {
        if (data.groupId === app.open && document.visibilityState === "visible") markRead();
        else if (data.seq > (app.acked.get(data.groupId) || 0)) {
          known.unread += 1;
          renderGroups();
        }
      }
      break;
    }
    case "a_typing":
      heardTyping(data);
      break;
    case "a_message_updated":
      messageUpdated(data);
      break;
    case "a_message_deleted":
      messageDeleted(data);
      break;
    case "a_reaction": {
      const list = app.messages.get(data.groupId);
      const m = list && list.get(data.seq);
      if (!m) break;
      const others = (m.reactions || []).filter((x) => x.emoji !== data.emoji);
      const mine = (m.reactions || []).find((x) => x.emoji === data.emoji);
      const reacted = data.userId === app.me ? data.added : !!(mine && mine.reacted);
      m.reactions = data.count > 0 ? [...others, { emoji: data.emoji, count: data.count, reacted }] : others;
      if (data.groupId === app.open) renderMessages();
      break;
    }
    case "a_mention":
      // marked in the list until the group is opened
      if (data.groupId !== app.open || document.hidden) {
        app.mentioned.add(data.groupId);
        renderGroups();
      }
      break;
    case "a_presence":
      app.online.set(data.userId, data.online);
      if (app.open) renderHeader();
      break;
    case "a_message_status":
      raiseMark(data.groupId, data.userId, data.deliveredSeq, data.readSeq);
      if (data.groupId === app.open) renderMessages();
      break;
    case "a_group_created":
    case "a_group_updated":
      groupChanged(data);
      break;
    case "error":
      showError(data.code || "internal", data.message || "error");
      break;
    default:
      break;
  }
}

// After every `a_session`: subscribe to the groups this page has not yet, refresh
// the list and its unread counts, and fetch what the loaded groups missed
// while away (pushes of the same messages are deduplicated by seq).
async function caughtUp() {
  try {
    loadGroups(await api.listGroups());
  } catch (e) {
    failed(e);
  }
  await Promise.all([...app.groups.keys()].map(subscribe));
  for (const groupId of app.messages.keys()) {
    const have = newestSeq(groupId);
    let before;
    for (;;) {
      let page;
      try {
        page = await api.history(groupId, before, PAGE);
      } catch (e) {
        failed(e);
        break;
      }
      const newer = page.messages.filter((m) => m.seq > have);
      merge(groupId, newer);
      if (newer.length < page.messages.length || page.messages.length < PAGE) break;
      before = Math.min(...page.messages.map((m) => m.seq));
    }
  }
  if (app.open) {
    const entry = app.groups.get(app.open);
    if (entry) entry.unread = 0;
    renderGroups();
    markRead();
    // statuses are live only: what members received or read while this
    // tab was away comes from the status endpoint
    seedReceipts(app.open);
  }
}

// ---------------------------------------------------------------- start

async function start() {
  $("#signin-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    signIn($("#token").value.trim());
  });
  $("#dev-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    try {
      const { token } = await api.devToken($("#dev-user").value.trim());
      await signIn(token);
    } catch (e) {
      failed(e);
    }
  });
  $("#signout").addEventListener("click", () => signOut());
  $("#error-close").addEventListener("click", () => {
    $("#error").hidden = true;
  });
  $("#create-group").addEventListener("submit", createGroup);
  $("#block-form").addEventListener("submit", blockUser);
  $("#composer").addEventListener("submit", sendText);
  $("#message-input").addEventListener("input", typed);
  $("#message-input").addEventListener("blur", () => stopTyping(app.open));
  $("#message-input").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) sendText(ev);
    if (ev.key === "Escape" && app.replying) stopReplying();
    if (ev.key === "Escape" && app.editing) {
      stopEditing();
      $("#message-input").value = "";
    }
  });
  $("#file-input").addEventListener("change", sendFile);
  $("#load-older").addEventListener("click", loadOlder);
  $("#search-form").addEventListener("submit", runSearch);
  $("#search-more").addEventListener("click", () => runSearch(null, true));
  $("#search-close").addEventListener("click", closeSearch);
  $("#create-invite").addEventListener("click", createInvite);
  $("#group-tools").addEventListener("toggle", () => {
    if ($("#group-tools").open) loadInvites();
  });
  $("#join-accept").addEventListener("click", acceptInvite);
  $("#join-dismiss").addEventListener("click", () => {
    app.invite = null;
    offerInvite();
  });
  window.addEventListener("hashchange", () => {
    const code = linkedInvite();
    if (code) {
      app.invite = code;
      offerInvite();
    }
  });
  $("#messages").addEventListener("scroll", () => {
    if ($("#messages").scrollTop === 0) loadOlder();
  });
  $("#back").addEventListener("click", closeGroup);
  $("#rename-form").addEventListener("submit", renameGroup);
  $("#add-member-form").addEventListener("submit", addMember);
  $("#mute-toggle").addEventListener("click", toggleMute);
  $("#leave-group").addEventListener("click", leaveGroup);
  $("#delete-group").addEventListener("click", deleteGroup);
  document.addEventListener("visibilitychange", markRead);

  let devTokens = false;
  try {
    devTokens = (await api.config()).devTokens === true;
  } catch {
    devTokens = false;
  }
  $("#dev-form").hidden = !devTokens;
  app.invite = linkedInvite();
  const linked = linkedToken();
  $("#signin").hidden = false;
  if (linked && devTokens) {
    await signIn(linked);
    return;
  }
  const token = savedToken();
  if (token) await signIn(token);
  else if (linked) offerLinkedToken(linked);
}

start();
