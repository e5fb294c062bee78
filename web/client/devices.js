// One device id per tab (PROTOCOL.md, "devices"): a pool in local storage,
// shared by the tabs of one browser, from which each tab claims a free id
// under a lease it renews while open. A reload keeps the tab's id (session
// storage); a tab opened later reuses an id no open tab holds, so it
// catches up on what that device missed; two open tabs never share one.

const LEASE_MS = 15000;
const RENEW_MS = 5000;
const MAX_POOL = 8;
const VALID = /^[A-Za-z0-9_-]{1,32}$/;

function load(key) {
  try {
    const pool = JSON.parse(localStorage.getItem(key) || "[]");
    return Array.isArray(pool) ? pool.filter((d) => d && VALID.test(d.id)) : [];
  } catch {
    return [];
  }
}

function fresh() {
  const bytes = crypto.getRandomValues(new Uint8Array(8));
  const abc = "abcdefghijklmnopqrstuvwxyz0123456789";
  return "web-" + Array.from(bytes, (b) => abc[b % abc.length]).join("");
}

export function claimDevice(userId) {
  const key = `chat.devices.${userId}`;
  const now = Date.now();
  const pool = load(key);
  let id = sessionStorage.getItem("chat.device");
  // a duplicated tab inherits session storage: an id another open tab still
  // holds is not ours (a reload released its own lease on the way out)
  const held = pool.some((d) => d.id === id && d.leaseUntil > now);
  if (!id || held || !VALID.test(id) || sessionStorage.getItem("chat.device.user") !== userId) {
    const free = pool.find((d) => !(d.leaseUntil > now));
    if (free) id = free.id;
    else if (pool.length < MAX_POOL) id = fresh();
    else id = pool.slice().sort((a, b) => a.leaseUntil - b.leaseUntil)[0].id;
  }
  const lease = () => {
    const p = load(key).filter((d) => d.id !== id);
    p.push({ id, leaseUntil: Date.now() + LEASE_MS });
    localStorage.setItem(key, JSON.stringify(p));
  };
  lease();
  sessionStorage.setItem("chat.device", id);
  sessionStorage.setItem("chat.device.user", userId);
  const timer = setInterval(lease, RENEW_MS);
  const release = () => {
    clearInterval(timer);
    const p = load(key).map((d) => (d.id === id ? { id, leaseUntil: 0 } : d));
    localStorage.setItem(key, JSON.stringify(p));
  };
  window.addEventListener("pagehide", release);
  return {
    id,
    release() {
      window.removeEventListener("pagehide", release);
      release();
    },
  };
}
