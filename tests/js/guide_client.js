// The guide's "Complete JavaScript Client Example" (spec/websocket-integration-guide.md), run under Node by
// tests/test_node_client.py against a real diary-ws server.
//
// Node has no browser WebSocket global, so the `ws` package stands in for it: that `require` is the one line
// added above the class. The class between the markers is the guide's code, verbatim. The guide's "Usage
// Example" (hard-wired to ws://localhost:8000) is replaced by the small driver at the bottom.
//
// Usage: node guide_client.js <base-url> <user-id> [timeout-seconds]
//   e.g.  node guide_client.js ws://127.0.0.1:8000 123456789 10
// Prints the first notification the class hands to onNotification as one JSON line on stdout, closes the
// socket with the class's own disconnect() and exits 0. Exits 1 if none arrives within the timeout (default
// 10 s) or the connection fails, and 2 on bad arguments.
const WebSocket = require('ws');

// ----- the guide's class, verbatim -----
class DiaryWebSocketClient {
    constructor(userId, baseUrl = 'ws://localhost:8000') {
        this.userId = userId;
        this.baseUrl = baseUrl;
        this.ws = null;
        this.isConnected = false;
        this.messageHandlers = new Map();
    }

    connect() {
        return new Promise((resolve, reject) => {
            this.ws = new WebSocket(`${this.baseUrl}/api/v1/ws/${this.userId}`);
            
            this.ws.onopen = () => {
                this.isConnected = true;
                console.log('WebSocket connected (receive-only mode)');
                resolve();
            };
            
            this.ws.onmessage = (event) => {
                const message = JSON.parse(event.data);
                this.handleMessage(message);
            };
            
            this.ws.onclose = () => {
                this.isConnected = false;
                console.log('WebSocket disconnected');
            };
            
            this.ws.onerror = (error) => {
                console.error('WebSocket error:', error);
                reject(error);
            };
        });
    }

    disconnect() {
        if (this.ws) {
            this.ws.close();
            this.ws = null;
            this.isConnected = false;
        }
    }

    handleMessage(message) {
        const handler = this.messageHandlers.get(message.type);
        if (handler) {
            handler(message);
        } else {
            console.log('Received message:', message);
        }
    }

    onMessage(type, handler) {
        this.messageHandlers.set(type, handler);
    }

    onNotification(handler) {
        this.onMessage('notification', handler);
    }


}
// ----- end of the guide's class -----

async function drive() {
    const [baseUrl, userId, seconds = '10'] = process.argv.slice(2);
    const limit = Number(seconds);
    if (!baseUrl || !userId || !(limit > 0)) {
        console.error('usage: node guide_client.js <base-url> <user-id> [timeout-seconds]');
        process.exit(2);
    }
    const timer = setTimeout(() => {
        console.error(`no notification within ${limit} s`);
        process.exit(1);
    }, limit * 1000);

    const client = new DiaryWebSocketClient(userId, baseUrl);
    client.onNotification((message) => {
        clearTimeout(timer);
        process.stdout.write(JSON.stringify(message) + '\n');
        const ws = client.ws;
        ws.addEventListener('close', () => process.exit(0));
        setTimeout(() => process.exit(0), 2000).unref(); // should the close handshake hang
        client.disconnect();
    });

    try {
        await client.connect();
    } catch (error) {
        console.error(`could not connect to ${baseUrl}/api/v1/ws/${userId}`);
        process.exit(1);
    }
}

drive();
