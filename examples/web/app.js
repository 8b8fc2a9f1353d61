// The demo page. It gets a usage token from the app's backend (this page's
// own origin), then talks to Tollgate directly with it: it opens a metered
// realtime session, streams the microphone as 16 kHz PCM, plays back what
// the service behind the session sends, shows the time left as Tollgate
// reports it, and reads its limits once a session has closed.

const VISITOR_KEY = 'tollgate-demo-visitor';
const SAMPLE_RATE = 16000;
// Playback never lags more than this behind; later frames are dropped.
const MAX_QUEUED_SECONDS = 1.0;
// Frames are dropped, not queued, while the socket has this much unsent.
const MAX_BUFFERED_BYTES = 64 * 1024;
const COUNTDOWN_MS = 100;

const $ = (id) => document.getElementById(id);
const ui = {
  remaining: $('remaining'),
  bar: $('bar'),
  fill: $('bar-fill'),
  warning: $('warning'),
  status: $('status'),
  title: $('status-title'),
  detail: $('status-detail'),
  start: $('start'),
  stop: $('stop'),
  buy: $('buy'),
  sent: $('frames-sent'),
  received: $('frames-received'),
  sessionId: $('session-id'),
  playback: $('playback'),
};

const visitor = visitorId();

// The time left: `value` seconds as of `at` (performance.now()), counted
// down locally while `counting`, between Tollgate's reports, by `rate`
// seconds a second (the pool's open sessions). `null` when unknown;
// `Infinity` when unlimited. `max` is the bar's full length.
const time = { value: null, at: 0, counting: false, max: 0, timer: 0, rate: 1 };

// The conversation in progress, if any.
let conversation = null;
let buying = false;

ui.start.addEventListener('click', start);
ui.stop.addEventListener('click', stop);
ui.buy.addEventListener('click', buy);
init();

async function init() {
  setState('loading', 'Loading…', 'Asking the app’s backend for your time.');
  try {
    const grant = await postJson('/api/token', { visitor });
    showTime(grant.remaining);
    if (grant.remaining !== null && grant.remaining <= 0) {
      showLimitReached();
    } else if (grant.new_visitor) {
      setState('idle', 'Ready', `Welcome. You have ${seconds(grant.remaining)} to talk.`);
    } else {
      setState('idle', 'Ready', 'Welcome back. Your time left is as you left it.');
    }
  } catch (error) {
    setState('error', 'The app’s backend does not answer', error.message);
  }
}

// --- A conversation: token, microphone, session -------------------------

async function start() {
  if (conversation) return;
  // Created in the click itself, so that the browser lets it play sound.
  const context = new AudioContext();
  const c = {
    ws: null,
    audio: { context },
    token: null,
    tollgateUrl: null,
    opened: false,
    live: false,
    stopping: false,
    sent: 0,
    received: 0,
    playAt: 0,
  };
  conversation = c;
  ui.sent.textContent = '0';
  ui.received.textContent = '0';
  ui.sessionId.textContent = 'none yet';
  delete ui.status.dataset.closeCode;
  delete ui.bar.dataset.serverRemaining;
  ui.bar.dataset.updates = '0';
  hideWarning();
  setState('connecting', 'Connecting…', 'Getting a usage token from the app’s backend.');
  try {
    const grant = await postJson('/api/token', { visitor });
    c.token = grant.token;
    c.tollgateUrl = grant.tollgate_url;
    showTime(grant.remaining);
    if (conversation !== c) return;
    if (grant.remaining !== null && grant.remaining <= 0) {
      finish(c);
      showLimitReached();
      return;
    }
    setState('connecting', 'Connecting…', 'Waiting for the microphone.');
    await startCapture(c);
    if (conversation !== c) return;
    setState('connecting', 'Connecting…', 'Opening the session at Tollgate.');
    openSession(c);
  } catch (error) {
    if (conversation !== c) return;
    finish(c);
    setState('error', 'Could not start the conversation', describe(error));
  }
}

async function startCapture(c) {
  if (!navigator.mediaDevices?.getUserMedia) {
    throw new Error('This browser gives no microphone to this page (it needs https or localhost).');
  }
  const media = await navigator.mediaDevices.getUserMedia({
    audio: {
      channelCount: 1,
      echoCancellation: true,
      noiseSuppression: true,
      autoGainControl: true,
    },
  });
  const audio = c.audio;
  audio.media = media;
  if (conversation !== c) {
    stopCapture(c);
    return;
  }
  const context = audio.context;
  context.resume().catch(() => {});
  await context.audioWorklet.addModule('/capture-worklet.js');
  audio.source = context.createMediaStreamSource(media);
  audio.capture = new AudioWorkletNode(context, 'pcm-capture', {
    numberOfInputs: 1,
    numberOfOutputs: 0,
    channelCount: 1,
    channelCountMode: 'explicit',
  });
  audio.capture.port.onmessage = (event) => sendFrame(c, event.data);
  audio.source.connect(audio.capture);
  audio.output = context.createGain();
  audio.output.connect(context.destination);
}

function openSession(c) {
  const url = new URL('/v1/realtime/session', c.tollgateUrl);
  url.protocol = url.protocol === 'https:' ? 'wss:' : 'ws:';
  url.searchParams.set('kind', 'conversational');
  url.searchParams.set('token', c.token);
  const ws = new WebSocket(url);
  ws.binaryType = 'arraybuffer';
  c.ws = ws;
  ws.onopen = () => {
    c.opened = true;
  };
  ws.onmessage = (event) => onMessage(c, event.data);
  ws.onclose = (event) => onClose(c, event);
}

function onMessage(c, data) {
  if (typeof data !== 'string') {
    c.received += 1;
    ui.received.textContent = String(c.received);
    play(c, data);
    return;
  }
  let message;
  try {
    message = JSON.parse(data);
  } catch {
    return; // text from the service behind the session; nothing to show
  }
  switch (message?.type) {
    case 'usage.session_started':
      c.live = true;
      time.rate = 1;
      ui.sessionId.textContent = message.session_id;
      setState('live', 'Conversation live', 'Speak: what you say comes back to you.');
      reported(message.remaining);
      break;
    case 'usage.remaining':
      // Sent only when the figures change: in between, the pool falls by
      // one second a second for each of its open sessions.
      time.rate = message.sessions ?? 1;
      reported(message.remaining);
      break;
    case 'usage.warning':
      showWarning(message.remaining);
      break;
  }
}

function onClose(c, event) {
  if (conversation !== c) return;
  finish(c);
  const code = event.code;
  ui.status.dataset.closeCode = String(code);
  if (code === 4001) {
    showTime(0);
    showLimitReached();
  } else if (code === 4002) {
    setState('ended', 'Access revoked', 'The app revoked this usage token.');
  } else if (code === 4004) {
    setState('ended', 'Session time limit reached', 'One session may last only so long. '
      + 'Start again to go on.');
  } else if (code === 1001) {
    setState('ended', 'Tollgate went away', 'The server is restarting. Try again in a moment.');
  } else if (code === 1008 && event.reason === 'client_too_slow') {
    setState('ended', 'Connection too slow', 'This page could not keep up with the audio '
      + 'coming back. Start again to go on.');
  } else if (code === 1008) {
    setState('ended', 'Connection timed out', 'Tollgate heard nothing from this page for too '
      + 'long. Start again to go on.');
  } else if (code === 4006) {
    setState('ended', 'The service hung up', 'The service behind the session closed it. '
      + 'Start again to go on.');
  } else if (code === 1011) {
    setState('error', 'Tollgate could not meter the session', 'Usage could not be recorded, '
      + 'so the session was closed. Try again later.');
  } else if (c.stopping) {
    setState('ended', 'Conversation ended', 'You stopped the conversation.');
  } else if (!c.opened) {
    setState('error', 'Could not open the session', 'Tollgate refused it or does not answer. '
      + `Is it running with --allowed-origins ${location.origin}?`);
  } else {
    setState('ended', 'Connection lost', `The session closed unexpectedly (code ${code}).`);
  }
  refreshLimits(c);
}

// Tollgate's word on what is left, read with the token alone (CORS lets
// this page do so). After a cut-off it reads 0.
async function refreshLimits(c) {
  try {
    const url = new URL('/v1/usage/limits', c.tollgateUrl);
    const response = await fetch(url, { headers: { Authorization: `Bearer ${c.token}` } });
    if (!response.ok || conversation) return;
    const limits = await response.json();
    const limit = limits.find((l) => l.type === 'conversational_seconds');
    showTime(limit ? limit.value : Infinity);
    if (limit && limit.value <= 0 && ui.status.dataset.state !== 'limit') showLimitReached();
  } catch {
    // The figure shown stays the last one Tollgate reported.
  }
}

function stop() {
  const c = conversation;
  if (!c) return;
  c.stopping = true;
  if (c.ws && c.ws.readyState <= WebSocket.OPEN) {
    c.ws.close(1000, 'stopped by the user');
    stopCapture(c);
    setState('stopping', 'Stopping…', 'Closing the session.');
  } else {
    finish(c);
    setState('ended', 'Conversation ended', 'You stopped before the session opened.');
  }
}

// Ends what is left of a conversation on this side.
function finish(c) {
  if (conversation === c) conversation = null;
  c.live = false;
  time.counting = false;
  stopCapture(c);
  if (c.ws && c.ws.readyState <= WebSocket.OPEN) c.ws.close(1000);
  render();
}

// --- Audio ---------------------------------------------------------------

function sendFrame(c, bytes) {
  const ws = c.ws;
  if (!c.live || !ws || ws.readyState !== WebSocket.OPEN) return;
  if (ws.bufferedAmount > MAX_BUFFERED_BYTES) return;
  ws.send(bytes);
  c.sent += 1;
  ui.sent.textContent = String(c.sent);
}

// Plays a frame of 16 kHz mono 16-bit little-endian PCM right after the
// one before it.
function play(c, data) {
  const { context, output } = c.audio;
  if (!output || !ui.playback.checked || data.byteLength < 2) return;
  const samples = data.byteLength >> 1;
  const view = new DataView(data);
  const buffer = context.createBuffer(1, samples, SAMPLE_RATE);
  const channel = buffer.getChannelData(0);
  for (let i = 0; i < samples; i++) channel[i] = view.getInt16(i * 2, true) / 32768;
  const now = context.currentTime;
  if (c.playAt < now) c.playAt = now + 0.04; // a small cushion at the start or after a gap
  if (c.playAt - now > MAX_QUEUED_SECONDS) return;
  const node = context.createBufferSource();
  node.buffer = buffer;
  node.connect(output);
  node.start(c.playAt);
  c.playAt += buffer.duration;
}

// Stops the microphone. It may run again, for a microphone granted after
// the conversation was stopped.
function stopCapture(c) {
  const audio = c.audio;
  audio.capture?.port.postMessage('stop');
  audio.source?.disconnect();
  audio.media?.getTracks().forEach((track) => track.stop());
  if (audio.closing) return;
  audio.closing = true;
  // Let what is queued play out, then free the audio device.
  const tail = Math.max(0, c.playAt - audio.context.currentTime);
  setTimeout(() => audio.context.close().catch(() => {}), tail * 1000 + 100);
}

// --- Buying more time ------------------------------------------------------

async function buy() {
  buying = true;
  updateButtons();
  try {
    const answer = await postJson('/api/buy', { visitor });
    hideWarning();
    showTime(answer.remaining, conversation?.live);
    const added = `${seconds(answer.added)} added.`;
    if (conversation?.live) {
      ui.detail.textContent = `${added} Keep talking.`;
    } else if (!conversation) {
      setState('idle', 'Ready', `${added} Start the conversation to use them.`);
    }
  } catch (error) {
    if (conversation) {
      ui.detail.textContent = `Could not buy more time: ${error.message}`;
    } else {
      setState('error', 'Could not buy more time', error.message);
    }
  } finally {
    buying = false;
    updateButtons();
  }
}

// --- What the page shows -----------------------------------------------------

function setState(state, title, detail) {
  ui.status.dataset.state = state;
  ui.title.textContent = title;
  ui.detail.textContent = detail;
  updateButtons();
}

function showLimitReached() {
  hideWarning();
  setState('limit', 'Usage limit reached', 'You have used all of your conversation time. '
    + 'Buy 30 more seconds to keep talking.');
}

function updateButtons() {
  const state = ui.status.dataset.state;
  ui.start.disabled = !['idle', 'ended', 'error'].includes(state);
  ui.stop.disabled = !['connecting', 'live'].includes(state);
  ui.buy.disabled = buying || state === 'loading';
  // A button that was just disabled takes the focus with it; hand it on.
  const focused = document.activeElement;
  if (focused instanceof HTMLButtonElement && focused.disabled) {
    const next = [ui.stop, ui.start, ui.buy].find((button) => !button.disabled);
    next?.focus();
  }
}

// A figure from Tollgate, during a session.
function reported(remaining) {
  ui.bar.dataset.serverRemaining = remaining === null ? 'unlimited' : String(remaining);
  ui.bar.dataset.updates = String(Number(ui.bar.dataset.updates ?? 0) + 1);
  showTime(remaining === null ? Infinity : remaining, conversation?.live);
}

function showTime(value, counting = false) {
  time.value = value ?? Infinity;
  time.at = performance.now();
  time.counting = Boolean(counting) && Number.isFinite(time.value);
  if (Number.isFinite(time.value)) time.max = Math.max(time.max, time.value);
  clearInterval(time.timer);
  if (time.counting) time.timer = setInterval(render, COUNTDOWN_MS);
  render();
}

function currentTime() {
  if (time.value === null || !time.counting) return time.value;
  return Math.max(0, time.value - time.rate * (performance.now() - time.at) / 1000);
}

function render() {
  const now = currentTime();
  if (now === null) return;
  if (!Number.isFinite(now)) {
    ui.remaining.textContent = 'Unlimited';
    ui.remaining.dataset.remaining = 'unlimited';
    ui.fill.style.width = '100%';
    ui.bar.setAttribute('aria-valuetext', 'unlimited');
    return;
  }
  ui.remaining.textContent = `${now.toFixed(1)} s`;
  ui.remaining.dataset.remaining = now.toFixed(3);
  const fraction = time.max > 0 ? now / time.max : 0;
  ui.fill.style.width = `${(fraction * 100).toFixed(2)}%`;
  ui.bar.classList.toggle('low', fraction < 0.25 || !ui.warning.hidden);
  ui.bar.classList.toggle('empty', now <= 0);
  ui.bar.setAttribute('aria-valuemax', time.max.toFixed(1));
  ui.bar.setAttribute('aria-valuenow', now.toFixed(1));
  ui.bar.setAttribute('aria-valuetext', `${Math.ceil(now)} seconds left`);
}

function showWarning(remaining) {
  ui.warning.textContent = `Only ${seconds(Math.ceil(remaining))} left. `
    + 'Buy more time to keep talking.';
  ui.warning.hidden = false;
  ui.bar.classList.add('low');
}

function hideWarning() {
  ui.warning.hidden = true;
  ui.bar.classList.remove('low');
}

function seconds(value) {
  if (value === null || !Number.isFinite(value)) return 'unlimited time';
  const rounded = Math.round(value * 10) / 10;
  return `${rounded} ${rounded === 1 ? 'second' : 'seconds'}`;
}

function describe(error) {
  if (error?.name === 'NotAllowedError') {
    return 'The browser blocked the microphone. Allow it for this page and try again.';
  }
  if (error?.name === 'NotFoundError') return 'No microphone was found.';
  return error?.message || String(error);
}

// --- The app's backend -------------------------------------------------------

async function postJson(path, body) {
  const response = await fetch(path, {
    method: 'POST',
    headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify(body),
  });
  const answer = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(answer.error || `The backend answered ${response.status}.`);
  return answer;
}

// A random id for this browser, kept so that reloading the page does not
// make a new visitor (and refill the time).
function visitorId() {
  const fresh = () => Array.from(crypto.getRandomValues(new Uint8Array(16)),
    (b) => b.toString(16).padStart(2, '0')).join('');
  try {
    let id = localStorage.getItem(VISITOR_KEY);
    if (!id) {
      id = fresh();
      localStorage.setItem(VISITOR_KEY, id);
    }
    return id;
  } catch {
    return fresh(); // storage is blocked: a visitor for this page load only
  }
}
