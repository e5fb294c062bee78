// REST calls of the client contract (PROTOCOL.md, "REST"): every error is an
// ApiError carrying the server's code.

export class ApiError extends Error {
  constructor(code, message, status = 0) {
    super(message);
    this.code = code;
    this.status = status;
  }
}

let token = null;

export function setToken(t) {
  token = t;
}

const enc = encodeURIComponent;

export async function request(method, path, body) {
  const headers = {};
  if (token) headers.Authorization = `Bearer ${token}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let res;
  try {
    res = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch {
    throw new ApiError("unavailable", "cannot reach the server");
  }
  const text = await res.text();
  let data = null;
  if (text) {
    try {
      data = JSON.parse(text);
    } catch {
      data = null;
    }
  }
  if (!res.ok) {
    const e = data && data.error;
    const code = (e && e.code) || (res.status === 401 ? "unauthorized" : "internal");
    throw new ApiError(code, (e && e.message) || res.statusText || "request failed", res.status);
  }
  return data;
}

export const config = () => request("GET", "/app/config.json");
export const devToken = (userId) => request("POST", "/dev/token", { userId });
export const listGroups = () => request("GET", "/groups?limit=100");
export const listBlocks = () => request("GET", "/blocks");
export const block = (userId) => request("PUT", `/blocks/${enc(userId)}`);
export const unblock = (userId) => request("DELETE", `/blocks/${enc(userId)}`);
export const createGroup = (name, members) => request("POST", "/groups", { name, members });
export const updateGroup = (group, changes) =>
  request("PATCH", `/groups/${enc(group)}`, changes);
export const addMembers = (group, userIds) =>
  request("POST", `/groups/${enc(group)}/members`, { userIds });
export const leaveGroup = (group) => request("DELETE", `/groups/${enc(group)}/members/me`);
export const deleteGroup = (group) => request("DELETE", `/groups/${enc(group)}`);
export const invites = (group) => request("GET", `/groups/${enc(group)}/invites`);
export const createInvite = (group) => request("POST", `/groups/${enc(group)}/invites`, {});
export const revokeInvite = (group, inviteId) =>
  request("DELETE", `/groups/${enc(group)}/invites/${enc(inviteId)}`);
export const joinGroup = (code) => request("POST", "/invites/join", { code });
export const pins = (group) => request("GET", `/groups/${enc(group)}/pins`);
export const pin = (group, messageId) =>
  request("PUT", `/groups/${enc(group)}/pins/${enc(messageId)}`);
export const unpin = (group, messageId) =>
  request("DELETE", `/groups/${enc(group)}/pins/${enc(messageId)}`);
export const removeMember = (group, userId) =>
  request("DELETE", `/groups/${enc(group)}/members/${enc(userId)}`);
export const transferOwner = (group, userId) =>
  request("POST", `/groups/${enc(group)}/owner`, { userId });
export const mute = (group) => request("PUT", `/groups/${enc(group)}/mute`, {});
export const unmute = (group) => request("DELETE", `/groups/${enc(group)}/mute`);
export const search = (group, q, before) =>
  request(
    "GET",
    `/groups/${enc(group)}/search?q=${enc(q)}` + (before ? `&before=${before}` : ""),
  );
export const history = (group, before, limit = 50) =>
  request(
    "GET",
    `/groups/${enc(group)}/messages?limit=${limit}` + (before ? `&before=${before}` : ""),
  );
export const groupPresence = (group) => request("GET", `/groups/${enc(group)}/presence`);
export const messageStatus = (group, id) =>
  request("GET", `/groups/${enc(group)}/messages/${enc(id)}/status`);
export const createUpload = (group, ticket) =>
  request("POST", `/groups/${enc(group)}/uploads`, ticket);
export const mediaUrl = (group, object) =>
  request("GET", `/groups/${enc(group)}/media/${enc(object)}/url`);

// PUTs `file` to a pre-signed upload URL with exactly the headers it names
// (no credentials); XMLHttpRequest, for progress events.
export function putFile(ticket, file, onProgress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open(ticket.method || "PUT", ticket.uploadUrl);
    for (const [k, v] of Object.entries(ticket.headers || {})) xhr.setRequestHeader(k, v);
    xhr.upload.onprogress = (e) => {
      if (e.lengthComputable) onProgress(e.loaded / e.total);
    };
    xhr.onload = () =>
      xhr.status >= 200 && xhr.status < 300
        ? resolve()
        : reject(new ApiError("unavailable", `upload failed (${xhr.status})`, xhr.status));
    xhr.onerror = () => reject(new ApiError("unavailable", "upload failed: network error"));
    xhr.send(file);
  });
}
