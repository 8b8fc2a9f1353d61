// Runs on the audio thread. Turns the microphone's samples (any rate, any
// number of channels) into 16 kHz mono 16-bit little-endian PCM and posts
// one 20 ms frame, 320 samples or 640 bytes, at a time to the page.

const TARGET_RATE = 16000;
const FRAME_SAMPLES = 320;

class PcmCapture extends AudioWorkletProcessor {
  constructor() {
    super();
    // Input samples per output sample. Each output sample is the mean of
    // the input samples that fall in its span, which filters out most of
    // what would alias when downsampling.
    this.step = sampleRate / TARGET_RATE;
    this.position = 0;
    this.nextOutput = this.step;
    this.sum = 0;
    this.count = 0;
    this.last = 0;
    this.frame = new DataView(new ArrayBuffer(FRAME_SAMPLES * 2));
    this.filled = 0;
    this.running = true;
    this.port.onmessage = (event) => {
      if (event.data === 'stop') this.running = false;
    };
  }

  process(inputs) {
    const channels = inputs[0];
    if (!this.running) return false;
    if (!channels || channels.length === 0) return true;
    const length = channels[0].length;
    for (let i = 0; i < length; i++) {
      let sample = 0;
      for (let c = 0; c < channels.length; c++) sample += channels[c][i];
      this.sum += sample / channels.length;
      this.count += 1;
      this.position += 1;
      while (this.position >= this.nextOutput) {
        if (this.count > 0) {
          this.last = this.sum / this.count;
          this.sum = 0;
          this.count = 0;
        }
        this.push(this.last);
        this.nextOutput += this.step;
      }
    }
    // Keep the counters small; only their difference matters.
    if (this.position > 1e7) {
      this.position -= 1e7;
      this.nextOutput -= 1e7;
    }
    return true;
  }

  push(sample) {
    const clamped = Math.max(-1, Math.min(1, sample));
    const value = Math.round(clamped < 0 ? clamped * 32768 : clamped * 32767);
    this.frame.setInt16(this.filled * 2, value, true);
    this.filled += 1;
    if (this.filled === FRAME_SAMPLES) {
      const bytes = this.frame.buffer;
      this.port.postMessage(bytes, [bytes]);
      this.frame = new DataView(new ArrayBuffer(FRAME_SAMPLES * 2));
      this.filled = 0;
    }
  }
}

registerProcessor('pcm-capture', PcmCapture);
